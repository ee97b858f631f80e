"""llama.cpp from Python: find an installed binding, load its native library, and give the runners one small API.

Two bindings are accepted; :data:`BINDING_ENV` (``PRUNEVIZ_LLAMA_BINDING``) names one, otherwise the first
installed in this order is used:

- ``llama-cpp-python`` (ctypes over libraries it builds from source: an hour on two cores, see the README);
- ``llama-cpp-py-sync`` (CFFI ABI mode over prebuilt CPU libraries, generated from llama.cpp's headers at each
  upstream build: a pinned requirement that installs in seconds, so llama.cpp runs in every test run and in CI).

Both mirror ``llama.h`` function for function, so a runner written against :class:`Api` (``api.lib.llama_decode``
…, plus :meth:`Api.floats`, :meth:`Api.tokenize`) runs on either. Runners live in subprocesses (a crash in native
code must not take the app down); the parent calls :func:`prepare` (which may write the compatible copy below) and
hands its plain-dict result to :func:`open_api` in the child, with :func:`runner_env` as the environment.

**glibc.** ``llama-cpp-py-sync``'s Linux libraries are built on a glibc 2.38 system, and the only symbols they take
from glibc 2.38 are the ISO C23 variants that GCC 13's headers select for ``strtol``, ``strtoul``, ``strtoull``,
``strtoll`` and the ``scanf`` family (``__isoc23_strtol`` …; they differ from the classic functions only in also
accepting a ``0b`` binary prefix, which llama.cpp never parses). On an older glibc (Debian 12 has 2.36) the
libraries do not load. :func:`compatible_libraries` then writes a copy of them into pruneviz's cache in which those
imports name the classic symbols (``strtol@GLIBC_2.2.5`` … on x86-64, ``@GLIBC_2.17`` on aarch64): the dynamic
string is shortened in place and the version requirement pointed at the architecture's glibc baseline; nothing else
changes. The installed package is never modified; the copy is keyed by the package version and the libraries'
content hash, and published atomically (a temporary folder renamed into place), so concurrent first runs cannot
corrupt it. A library that needs any other glibc 2.38 symbol is refused with the list of symbols and the way out
(build ``llama-cpp-python`` from source).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from . import fsio
from .errors import ExportError

__all__ = ["BINDINGS", "BINDING_ENV", "Api", "Binding", "binding", "clear_compatible_copies", "compatible_copies",
           "compatible_libraries", "describe",
           "glibc_version", "installed", "libraries", "open_api", "package_dir", "patch_c23_imports", "prepare",
           "runner_env", "versions_needed"]

BINDING_ENV = "PRUNEVIZ_LLAMA_BINDING"
# distribution name -> import name
BINDINGS = {"llama-cpp-python": "llama_cpp", "llama-cpp-py-sync": "llama_cpp_py_sync"}
INSTALL_HINT = ("install the pinned prebuilt binding (`pip install -r requirements.txt` installs "
                "llama-cpp-py-sync), or build llama-cpp-python from source (README 'Installing llama.cpp's Python "
                "binding')")

# The C23 aliases GCC 13+ headers emit (glibc 2.38) and the classic symbols with the same behaviour but for "0b".
C23_ALIASES = {"__isoc23_strtol": "strtol", "__isoc23_strtoul": "strtoul", "__isoc23_strtoll": "strtoll",
               "__isoc23_strtoull": "strtoull", "__isoc23_strtoimax": "strtoimax",
               "__isoc23_strtoumax": "strtoumax", "__isoc23_sscanf": "sscanf", "__isoc23_vsscanf": "vsscanf",
               "__isoc23_fscanf": "fscanf", "__isoc23_vfscanf": "vfscanf", "__isoc23_scanf": "scanf",
               "__isoc23_vscanf": "vscanf"}
# the glibc baseline version of every classic symbol above, per ELF machine (the first glibc of that architecture)
CLASSIC_VERSION = {"EM_X86_64": "GLIBC_2.2.5", "EM_AARCH64": "GLIBC_2.17"}


@dataclass(frozen=True)
class Binding:
    """An installed binding: distribution ``name`` and ``version``, its import ``module``."""

    name: str
    version: str
    module: str


def installed() -> list[Binding]:
    """Every accepted binding that is installed (looked up without importing any native library)."""
    out = []
    for name, module in BINDINGS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if find_spec(module) is not None:
            out.append(Binding(name, version, module))
    return out


def binding() -> Binding | None:
    """The binding runners use: the one :data:`BINDING_ENV` names (an error if it is not installed), else the first
    of :func:`installed`, else None."""
    have = installed()
    want = os.environ.get(BINDING_ENV, "").strip()
    if want:
        for b in have:
            if b.name == want:
                return b
        raise ExportError(f"{BINDING_ENV}={want!r} but that binding is not installed; installed: "
                          f"{', '.join(b.name for b in have) or 'none'} (accepted: {', '.join(BINDINGS)})")
    return have[0] if have else None


def describe(b: Binding | None = None) -> str | None:
    """``"llama-cpp-py-sync 0.11739"`` for the binding in use (None when there is none)."""
    b = b or binding()
    return f"{b.name} {b.version}" if b else None


def glibc_version() -> tuple[int, int] | None:
    """The running glibc as (major, minor); None on another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    m = re.fullmatch(r"glibc (\d+)\.(\d+).*", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---- the compatible copy of prebuilt libraries ----------------------------------------------------------------------

def package_dir(module: str) -> Path:
    """The folder of the installed package ``module`` (where its native libraries live)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the {module} package is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def libraries(folder: Path) -> list[Path]:
    """The shared libraries in ``folder`` (regular files; symlinks are recreated by the copy)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and re.search(r"\.so(\.\d+)*$", p.name))


def versions_needed(path: Path) -> dict[str, list[str]]:
    """``{glibc version: [imported symbol, ...]}`` of one ELF library (``GLIBC_*`` versions only)."""
    from elftools.elf.elffile import ELFFile

    data = bytearray(path.read_bytes())
    out: dict[str, list[str]] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for name, version, _ in _imports(elf, data):
            if version.startswith("GLIBC_"):
                out.setdefault(version, []).append(name)
    return out


def _imports(elf, data: bytearray):
    """``(symbol, version name, vna_other)`` of every versioned undefined dynamic symbol."""
    dynstr, dynsym = elf.get_section_by_name(".dynstr"), elf.get_section_by_name(".dynsym")
    versym, verneed = elf.get_section_by_name(".gnu.version"), elf.get_section_by_name(".gnu.version_r")
    if dynsym is None or versym is None or verneed is None:
        return
    aux = _vernaux_entries(data, verneed["sh_offset"], dynstr["sh_offset"])
    for i, sym in enumerate(dynsym.iter_symbols()):
        ix = struct.unpack_from("<H", data, versym["sh_offset"] + 2 * i)[0] & 0x7FFF
        if sym["st_shndx"] == "SHN_UNDEF" and ix in aux:
            yield sym.name, aux[ix][1], ix


def _too_new(needed: dict[str, list[str]], glibc: tuple[int, int]) -> dict[str, list[str]]:
    def ver(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.removeprefix("GLIBC_").split("."))
    return {v: syms for v, syms in needed.items() if ver(v)[:2] > glibc}


def _elf_hash(name: bytes) -> int:
    """The SysV ELF hash (``vna_hash`` of a version requirement)."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def patch_c23_imports(path: Path, glibc: tuple[int, int]) -> list[str]:
    """Rewrite ``path`` (a copy) so its imports newer than ``glibc`` name the classic symbols; returns what was
    renamed. Every too-new import must be one of :data:`C23_ALIASES`, else ExportError (nothing is written)."""
    from elftools.elf.elffile import ELFFile

    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf.elfclass != 64 or not elf.little_endian:
            raise ExportError(f"{path.name}: only 64-bit little-endian libraries are adapted")
        dynstr, dynsym = elf.get_section_by_name(".dynstr"), elf.get_section_by_name(".dynsym")
        versym, verneed = elf.get_section_by_name(".gnu.version"), elf.get_section_by_name(".gnu.version_r")
        aux = _vernaux_entries(data, verneed["sh_offset"], dynstr["sh_offset"])  # index -> (offset, name)
        bad = {ix for ix, (_, name) in aux.items()
               if name.startswith("GLIBC_") and _too_new({name: []}, glibc)}
        if not bad:
            return []
        baseline = CLASSIC_VERSION.get(elf["e_machine"])
        if baseline is None:
            raise ExportError(f"{path.name}: no classic glibc baseline known for {elf['e_machine']}; build "
                              f"llama-cpp-python from source instead (README)")
        classic = next((off for off, name in aux.values() if name == baseline), None)
        if classic is None:
            raise ExportError(f"{path.name} needs no {baseline} symbol to point the C23 imports at")
        renamed, unknown, shared = [], [], _string_refs(elf)
        for i, sym in enumerate(dynsym.iter_symbols()):
            ix = struct.unpack_from("<H", data, versym["sh_offset"] + 2 * i)[0] & 0x7FFF
            if ix not in bad:
                continue
            new = C23_ALIASES.get(sym.name)
            if new is None or sym["st_shndx"] != "SHN_UNDEF":
                unknown.append(sym.name)
                continue
            start = sym["st_name"]
            if any(start < ref <= start + len(new) for ref in shared):  # a string the linker merged into this one
                raise ExportError(f"{path.name}: another name shares the string of {sym.name}; cannot rename it "
                                  f"in place (build llama-cpp-python from source instead, README)")
            at = dynstr["sh_offset"] + start
            data[at:at + len(new) + 1] = new.encode() + b"\0"  # shorter: the tail of the old name stays unread
            renamed.append(f"{sym.name} -> {new}")
        if unknown:
            raise ExportError(f"{path.name} needs glibc symbols newer than this system's glibc "
                              f"{glibc[0]}.{glibc[1]} that have no classic equivalent: {', '.join(sorted(unknown))}; "
                              f"build llama-cpp-python from source instead (README)")
        name_off = struct.unpack_from("<I", data, classic + 8)[0]
        for ix in bad:  # vna_hash, vna_flags, vna_other, vna_name
            struct.pack_into("<IHHI", data, aux[ix][0], _elf_hash(baseline.encode()), 0, ix, name_off)
    path.write_bytes(data)
    return renamed


def _string_refs(elf) -> set[int]:
    """Every ``.dynstr`` offset the library refers to: symbol names, version names and files, dynamic entries."""
    refs = {sym["st_name"] for sym in elf.get_section_by_name(".dynsym").iter_symbols()}
    sec = elf.get_section_by_name(".gnu.version_r")
    if sec is not None:
        for need, auxes in sec.iter_versions():
            refs.add(need["vn_file"])
            refs.update(aux["vna_name"] for aux in auxes)
    dyn = elf.get_section_by_name(".dynamic")
    if dyn is not None:
        refs.update(t.entry.d_val for t in dyn.iter_tags()
                    if t.entry.d_tag in ("DT_NEEDED", "DT_SONAME", "DT_RPATH", "DT_RUNPATH"))
    return refs


def _vernaux_entries(data: bytearray, start: int, strtab: int) -> dict[int, tuple[int, str]]:
    """``{vna_other: (file offset of the Elf64_Vernaux, version name)}`` from the raw ``.gnu.version_r``."""
    def cstr(off: int) -> str:
        return bytes(data[strtab + off:data.index(b"\0", strtab + off)]).decode()

    out, need = {}, start
    while True:
        _, cnt, _, aux_off, nxt = struct.unpack_from("<HHIII", data, need)
        a = need + aux_off
        for _ in range(cnt):
            _, _, other, name, anext = struct.unpack_from("<IHHII", data, a)
            out[other] = (a, cstr(name))
            if not anext:
                break
            a += anext
        if not nxt:
            return out
        need += nxt


def compatible_libraries(folder: Path, version: str, glibc: tuple[int, int] | None = None,
                         cache: Path | None = None) -> Path:
    """The folder to load the libraries of ``folder`` from on this glibc: ``folder`` itself when they load as they
    are, else the adapted copy in ``cache`` (default pruneviz's cache, ``llama.cpp/``), made once (see the module
    doc). ExportError when they need something no copy can provide."""
    glibc = glibc or glibc_version()
    libs = libraries(folder)
    if glibc is None or not libs:
        return folder
    too_new = {}
    for lib in libs:
        for v, syms in _too_new(versions_needed(lib), glibc).items():
            too_new.setdefault(v, []).extend(syms)
    if not too_new:
        return folder
    digest = hashlib.sha256()
    for lib in libs:
        digest.update(lib.name.encode())
        digest.update(hashlib.sha256(lib.read_bytes()).digest())
    if cache is None:
        from .loading import cache_dir  # noqa: PLC0415 (torch-heavy; only the parent process gets here)
        cache = cache_dir()
    target = cache / "llama.cpp" / f"{folder.name}-{version}-glibc{glibc[0]}.{glibc[1]}-{digest.hexdigest()[:16]}"
    if (target / "libllama.so").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fsio.remove_stale_temporaries(target)
    tmp = fsio.temp_folder(target)
    try:
        for lib in libs:
            shutil.copy2(lib, tmp / lib.name)
            patch_c23_imports(tmp / lib.name, glibc)
        try:
            fsio.install_folder(tmp, target)
        except ExportError:
            if not (target / "libllama.so").is_file():  # another process published it first: use that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def compatible_copies(cache: Path | None = None) -> list[dict]:
    """The glibc-compatible library copies in the cache (``folder``, ``bytes``), for ``python -m pruneviz cache``."""
    if cache is None:
        from .loading import cache_dir  # noqa: PLC0415
        cache = cache_dir()
    root = cache / "llama.cpp"
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "libllama.so").is_file():
            out.append({"folder": str(folder), "bytes": sum(p.stat().st_size for p in folder.iterdir())})
    return out


def clear_compatible_copies(cache: Path | None = None) -> int:
    """Delete the :func:`compatible_copies` (pruneviz made them; the next llama.cpp run makes one again);
    returns how many were removed."""
    gone = compatible_copies(cache)
    for entry in gone:
        shutil.rmtree(entry["folder"], ignore_errors=True)
    return len(gone)


# ---- what the parent hands the runner --------------------------------------------------------------------------------

def prepare(b: Binding | None = None) -> dict:
    """Everything a runner subprocess needs to open the binding (plain data): ``binding``, ``version``,
    ``library`` (the libllama to load) and ``adapted`` (whether it is the glibc-compatible copy).
    ExportError when no binding is installed."""
    b = b or binding()
    if b is None:
        raise ExportError(f"no llama.cpp binding is installed; {INSTALL_HINT}")
    if b.module == "llama_cpp":
        return {"binding": b.name, "version": b.version, "library": None, "adapted": False}
    folder = package_dir(b.module)
    lib_dir = compatible_libraries(folder, b.version)
    return {"binding": b.name, "version": b.version, "library": str(lib_dir / "libllama.so"),
            "adapted": lib_dir != folder}


def runner_env(env: dict) -> dict:
    """``env`` with pruneviz importable in a ``python -c`` runner (its parent folder first on PYTHONPATH)."""
    root = str(Path(__file__).resolve().parents[1])
    rest = env.get("PYTHONPATH", "")
    return {**env, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


class Api:
    """One binding's ``llama.h`` functions (:attr:`lib`) and the few things that differ between ctypes and CFFI."""

    def __init__(self, prepared: dict):
        self.binding, self.version = prepared["binding"], prepared["version"]
        self.adapted = bool(prepared.get("adapted"))
        if self.binding == "llama-cpp-python":
            import llama_cpp

            self.lib, self._ffi = llama_cpp, None
            self.library = getattr(getattr(llama_cpp.llama_cpp, "_lib", None), "_name", None)
        else:
            # the generated cdef matches the libraries shipped with the same package version
            from llama_cpp_py_sync._cffi_bindings import ffi

            self.lib, self._ffi = ffi.dlopen(prepared["library"]), ffi
            self.library = prepared["library"]

    def capture_log(self, keep: int = 12) -> None:
        """Route llama.cpp's log into memory (its INFO chatter off the runner's stderr); :meth:`log_tail` returns
        the last ``keep`` warning and error lines, for the reason a file did not load."""
        from collections import deque

        self._log = deque(maxlen=keep)

        def on_log(level, text, _user):
            if int(level) in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                line = (text if isinstance(text, bytes) else self._ffi.string(text)).decode(errors="replace")
                if line.strip():
                    self._log.append(line.strip())

        if self._ffi is None:
            self._callback = self.lib.llama_log_callback(on_log)
        else:
            self._callback = self._ffi.callback("void(enum ggml_log_level, const char *, void *)", on_log)
        self.lib.llama_log_set(self._callback, None if self._ffi is None else self._ffi.NULL)

    def log_tail(self) -> str:
        return " / ".join(getattr(self, "_log", ())) or "no warning or error was logged"

    def floats(self, ptr, n: int):
        """A float32 numpy view of ``n`` floats at ``ptr`` (e.g. ``llama_get_logits_ith``)."""
        import numpy as np

        if self._ffi is None:
            return np.ctypeslib.as_array(ptr, shape=(n,))
        return np.frombuffer(self._ffi.buffer(ptr, 4 * n), dtype=np.float32)

    def tokenize(self, vocab, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """``llama_tokenize`` of ``text`` (UTF-8) into a list of token ids."""
        raw = text.encode()
        n_max = len(raw) + 8
        buf = self._tokens(n_max)
        n = self.lib.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        if n < 0:
            buf, n_max = self._tokens(-n), -n
            n = self.lib.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        return [int(buf[i]) for i in range(n)]

    def _tokens(self, n: int):
        if self._ffi is None:
            return (self.lib.llama_token * n)()
        return self._ffi.new("llama_token[]", n)

    def describe(self) -> dict:
        return {"binding": self.binding, "version": self.version, "library": self.library, "adapted": self.adapted}


def open_api(prepared: dict) -> Api:
    """The :class:`Api` for :func:`prepare`'s result (call in the runner subprocess)."""
    return Api(prepared)
