"""The llama.cpp binding layer (pruneviz/llamacpp.py): which binding, and the glibc-compatible library copy."""
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pruneviz import llamacpp as LC
from pruneviz.errors import ExportError

SYNC = next((b for b in LC.installed() if b.name == "llama-cpp-py-sync"), None)
needs_sync = pytest.mark.skipif(SYNC is None, reason="llama-cpp-py-sync (requirements.txt) is not installed")
OLD_GLIBC = (2, 36)  # Debian 12's; the prebuilt libraries need 2.38 for their C23 strtol/sscanf imports


def _folder() -> Path:
    return LC.package_dir(SYNC.module) if SYNC else Path()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in LC.libraries(folder)}


def _newest_glibc(folder: Path) -> tuple[int, ...]:
    need = set()
    for lib in LC.libraries(folder):
        need |= set(LC.versions_needed(lib))
    return max(tuple(int(x) for x in v.removeprefix("GLIBC_").split(".")) for v in need)


def _loads(lib: Path) -> subprocess.CompletedProcess:
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('loaded')"
    return subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=120)


def test_binding_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv(LC.BINDING_ENV, "no-such-binding")
    with pytest.raises(ExportError, match="not installed.*accepted: llama-cpp-python, llama-cpp-py-sync"):
        LC.binding()
    monkeypatch.delenv(LC.BINDING_ENV)
    have = LC.installed()
    assert LC.binding() == (have[0] if have else None)
    assert LC.describe() == (f"{have[0].name} {have[0].version}" if have else None)


def test_prepare_without_any_binding_says_how_to_install(monkeypatch):
    monkeypatch.setattr(LC, "installed", lambda: [])
    with pytest.raises(ExportError, match="no llama.cpp binding is installed; install the pinned"):
        LC.prepare()


def test_glibc_version_reads_the_running_c_library():
    v = LC.glibc_version()
    assert v is None or (v[0] == 2 and v[1] >= 17)


@needs_sync
def test_new_enough_glibc_loads_the_installed_libraries_as_they_are(tmp_path):
    assert LC.compatible_libraries(_folder(), SYNC.version, glibc=(2, 99), cache=tmp_path) == _folder()
    assert not any(tmp_path.iterdir())


@needs_sync
def test_compatible_copy_needs_only_the_old_glibc_and_leaves_the_package_alone(tmp_path):
    folder, before = _folder(), _digests(_folder())
    assert _newest_glibc(folder) >= (2, 38)  # what makes the copy necessary (if this fails, drop the copy)
    copy = LC.compatible_libraries(folder, SYNC.version, glibc=OLD_GLIBC, cache=tmp_path)
    assert copy != folder and copy.parent == tmp_path / "llama.cpp"
    assert _digests(folder) == before
    assert set(_digests(copy)) == set(before) and _newest_glibc(copy) <= OLD_GLIBC
    for lib in LC.libraries(copy):  # no C23 alias left; every other import kept
        names = {n for syms in LC.versions_needed(lib).values() for n in syms}
        orig = {n for syms in LC.versions_needed(folder / lib.name).values() for n in syms}
        assert not any(n.startswith("__isoc23_") for n in names)
        assert names == {LC.C23_ALIASES.get(n, n) for n in orig}
    stamp = (copy / "libllama.so").stat().st_mtime_ns
    assert LC.compatible_libraries(folder, SYNC.version, glibc=OLD_GLIBC, cache=tmp_path) == copy
    assert (copy / "libllama.so").stat().st_mtime_ns == stamp  # made once
    assert "loaded" in _loads(copy / "libllama.so").stdout


@needs_sync
@pytest.mark.skipif((LC.glibc_version() or (9, 9)) >= (2, 38), reason="this glibc loads the prebuilt libraries")
def test_on_this_glibc_the_prebuilt_library_does_not_load_and_prepare_adapts_it(tmp_path, monkeypatch):
    res = _loads(_folder() / "libllama.so")
    assert res.returncode != 0 and "GLIBC_2.38" in res.stderr
    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path))
    prepared = LC.prepare(SYNC)
    assert prepared["adapted"] and Path(prepared["library"]).is_relative_to(tmp_path)


@needs_sync
def test_concurrent_first_runs_publish_one_complete_copy(tmp_path):
    got, errors, gate = [], [], threading.Barrier(3)

    def run():
        gate.wait()
        try:
            got.append(LC.compatible_libraries(_folder(), SYNC.version, glibc=OLD_GLIBC, cache=tmp_path))
        except Exception as e:  # noqa: BLE001 (collected for the assertion)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1
    assert [p.name for p in (tmp_path / "llama.cpp").iterdir()] == [got[0].name]  # no temporary left behind
    assert _digests(got[0]) == _digests(LC.compatible_libraries(_folder(), SYNC.version, glibc=OLD_GLIBC,
                                                               cache=tmp_path / "again"))


@needs_sync
def test_an_unknown_too_new_import_is_refused_with_the_way_out(tmp_path):
    lib = tmp_path / "libggml-base.so.0"
    data = bytearray((_folder() / lib.name).read_bytes())
    at = data.index(b"__isoc23_strtol\0")
    data[at:at + 15] = b"__isoc23_strtox"  # a glibc 2.38 import with no classic twin
    lib.write_bytes(data)
    with pytest.raises(ExportError, match=r"no classic equivalent: __isoc23_strtox; build llama-cpp-python"):
        LC.patch_c23_imports(lib, OLD_GLIBC)
    assert lib.read_bytes() == data  # nothing written


def test_runner_env_makes_pruneviz_importable_from_anywhere(tmp_path):
    env = LC.runner_env({"PATH": "/usr/bin:/bin", "PYTHONPATH": "/elsewhere"})
    res = subprocess.run([sys.executable, "-c", "import pruneviz.llamacpp, sys; print(pruneviz.llamacpp.__file__)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == LC.__file__
    assert env["PYTHONPATH"].endswith("/elsewhere")


@needs_sync
def test_cache_lists_and_clears_the_compatible_copies(tmp_path, monkeypatch, capsys):
    from pruneviz.cli import main

    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path))
    copy = LC.compatible_libraries(_folder(), SYNC.version, glibc=OLD_GLIBC)
    mine = tmp_path / "llama.cpp" / "notes"  # not a library copy: left alone
    mine.mkdir()
    assert [e["folder"] for e in LC.compatible_copies()] == [str(copy)]
    assert main(["cache", "list"]) == 0 and "llama.cpp libraries adapted" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "1 glibc-compatible" in capsys.readouterr().out
    assert not copy.exists() and mine.is_dir() and _digests(_folder())  # the installed package is untouched


@needs_sync
def test_a_name_merged_into_a_renamed_string_is_refused(tmp_path, monkeypatch):
    """Linkers may store "tol" as the tail of "__isoc23_strtol": a rename that would overwrite such a tail is
    refused instead of corrupting the other name (here a reference is planted one byte into the string)."""
    from elftools.elf.elffile import ELFFile

    lib = tmp_path / "libggml-base.so.0"
    lib.write_bytes((_folder() / lib.name).read_bytes())
    with open(lib, "rb") as f:
        sym = next(s for s in ELFFile(f).get_section_by_name(".dynsym").iter_symbols() if s.name.startswith("__isoc23"))
        start = sym["st_name"]
    real = LC._string_refs
    monkeypatch.setattr(LC, "_string_refs", lambda elf: real(elf) | {start + 1})
    before = lib.read_bytes()
    with pytest.raises(ExportError, match="shares the string"):
        LC.patch_c23_imports(lib, OLD_GLIBC)
    assert lib.read_bytes() == before
