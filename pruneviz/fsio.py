"""Writing files and folders so that nothing is half-written, nothing is lost, and failures say what to do.

Every file pruneviz writes (plan JSON, scores JSON, model cards, recovery records, checkpoints) goes through this
module:

- :func:`atomic_write_text` / :func:`atomic_write_bytes`: a temporary file in the target's folder, flushed and
  fsynced, then renamed over the target (``os.replace``), so readers see the old file or the new one, never a
  partial one. The file gets the user's normal permissions (``0666 & ~umask``), not ``mkstemp``'s 0600.
- :func:`temp_folder` / :func:`install_folder`: the folder variant. The temporary folder lies beside the target
  (same file system, so the rename is atomic), carries a marker file naming its target and the process that made
  it, gets ``0777 & ~umask`` permissions (not ``mkdtemp``'s 0700), and every file in it is fsynced before the
  rename. :func:`remove_stale_temporaries` deletes what a killed run left for the same target (only folders with
  pruneviz's marker whose process is gone).
- :func:`check_file_target` / :func:`check_folder_target`: the checks that can be made before slow work (a
  name too long for the file system, a missing parent folder, a target that is a folder, not enough free space),
  each a one-line :class:`~pruneviz.errors.ExportError`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import ExportError

TEMP_MARKER = ".pruneviz-temporary.json"  # inside every temporary folder pruneviz makes
NAME_MAX = 255  # bytes per path component (Linux, macOS)
PATH_MAX = 4096


# ---- permissions ----------------------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def normal_permissions(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions of a plain ``open``/``mkdir``."""
    mask = current_umask()
    if path.is_dir():
        for child in path.rglob("*"):
            child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)
        path.chmod(0o777 & ~mask)
    else:
        path.chmod(0o666 & ~mask)


# ---- checks before slow work ----------------------------------------------------------------------------------------

def check_name(path: Path) -> None:
    """Refuse path components longer than the file system allows (255 bytes), with the name in the message."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise ExportError(f"the name {shown!r} is {len(os.fsencode(part))} bytes long; file systems allow at "
                              f"most {NAME_MAX} bytes per name. Choose a shorter name")
    if len(os.fsencode(str(path))) > PATH_MAX:
        raise ExportError(f"the path {str(path)[:40]}... is longer than {PATH_MAX} bytes; choose a shorter path")


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse when ``folder``'s file system has less than ``need_bytes`` free (with a message in MB)."""
    free = free_bytes(folder)
    if free is not None and need_bytes > free:
        raise ExportError(f"not enough free space for {what} in {folder}: about {need_bytes / 1e6:,.1f} MB needed, "
                          f"{free / 1e6:,.1f} MB free. Free disk space or choose another folder")


def check_file_target(path: str | os.PathLike, need_bytes: int = 0, what: str = "the file") -> Path:
    """``path`` as a Path, after checking that a file can be written there: a name the file system accepts, an
    existing parent folder, not a folder itself, enough free space. Raises ExportError saying what to do."""
    path = Path(path).expanduser()
    check_name(path)
    if str(path) in ("", ".", "..") or path.name in ("", ".", ".."):
        raise ExportError(f"{str(path)!r} is a folder, not a file name; give {what} a file name such as out.json")
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give {what} a file name (for example {path / 'out.json'})")
    parent = path.parent
    if not parent.is_dir():
        why = "is a file, not a folder" if parent.exists() else "does not exist"
        raise ExportError(f"cannot write {what} to {path}: its folder {parent} {why}. Create the folder first or "
                          f"choose another path")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {what} to {path}: the folder {parent} is not writable; choose another path")
    check_space(parent, need_bytes, what)
    return path


def check_folder_target(folder: str | os.PathLike, need_bytes: int = 0, what: str = "the export") -> Path:
    """``folder`` as an absolute Path after the checks :func:`check_file_target` makes for files; missing parent
    folders are created (an export target is a folder: ``out/model`` makes ``out``)."""
    folder = Path(folder).expanduser().absolute()
    check_name(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; {what} is a folder. Choose another name")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder {folder.parent} ({e.strerror or e}); choose a writable "
                          f"folder") from e
    if not os.access(folder.parent, os.W_OK):
        raise ExportError(f"cannot write {what} into {folder.parent}: the folder is not writable; choose another")
    check_space(folder.parent, need_bytes, what)
    return folder


def os_error_message(e: OSError, path: Path, what: str) -> str:
    """A one-line explanation of an OSError met while writing ``what`` to ``path``."""
    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing {what} to {path}; nothing was written. Free disk space and retry"
    if e.errno == errno.ENAMETOOLONG:
        return f"the name {path.name[:40]!r} is too long for the file system; choose a shorter name"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {what} to {path}; choose a writable folder"
    return f"writing {what} to {path} failed ({e.strerror or e}); nothing was written. Choose another path"


# ---- atomic files ---------------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "the file") -> Path:
    """Write ``data`` to ``path`` atomically (temporary file beside it, fsync, rename). The parent must exist
    (see :func:`check_file_target`). On failure the target is unchanged and no temporary file is left; OSError
    becomes an ExportError saying what happened."""
    path = check_file_target(path, len(data), what)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".pruneviz-tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        normal_permissions(Path(tmp))
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise ExportError(os_error_message(e, path, what)) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "the file") -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), what)


# ---- atomic folders -------------------------------------------------------------------------------------------------

def _temp_prefix(target: Path) -> str:
    return f".{target.name[:180]}.tmp-"


def temp_folder(target: str | os.PathLike) -> Path:
    """A new temporary folder beside ``target`` (normal permissions) holding pruneviz's marker: what it is for,
    and which process on which host made it (so a later run can tell a stale one from a live one)."""
    target = Path(target).absolute()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target)))
    try:
        (tmp / TEMP_MARKER).write_text(json.dumps({"target": str(target), "pid": os.getpid(),
                                                   "host": socket.gethostname()}), encoding="utf-8")
        normal_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Temporary folders of ``target`` left by pruneviz runs that are gone (killed): marker present, naming this
    target, made on this host by a process that no longer exists. Anything else is left alone."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    out = []
    for cand in target.parent.glob(_temp_prefix(target) + "*"):
        try:
            mark = json.loads((cand / TEMP_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours (or not readable): never touched
        if not isinstance(mark, dict) or mark.get("target") != str(target):
            continue
        if mark.get("host") == socket.gethostname() and isinstance(mark.get("pid"), int) \
                and not _pid_alive(mark["pid"]) and mark["pid"] != os.getpid():
            out.append(cand)
    return sorted(out)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``target``; returns what was removed."""
    gone = stale_temporaries(target)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def sync_folder(folder: Path) -> None:
    """fsync every file in ``folder`` (recursively) and the folder itself, so a rename publishes complete data."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def install_folder(tmp: Path, target: Path, replace_existing: bool = False) -> None:
    """Publish ``tmp`` (a :func:`temp_folder`) as ``target``: its marker removed, data fsynced, renamed.

    With ``replace_existing`` an existing ``target`` is moved aside first and deleted after the rename (the caller
    decides whether it may be replaced); otherwise an existing target is an ExportError.
    """
    (tmp / TEMP_MARKER).unlink(missing_ok=True)
    sync_folder(tmp)
    if target.exists():
        if not replace_existing:
            raise ExportError(f"{target} appeared while exporting; choose another folder")
        old = target.with_name(f"{_temp_prefix(target)}old-{os.getpid()}")
        os.replace(target, old)
        (old / TEMP_MARKER).write_text(json.dumps({"target": str(target), "pid": os.getpid(),
                                                   "host": socket.gethostname()}), encoding="utf-8")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


# ---- strict JSON ----------------------------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64


def _no_duplicate_keys(error, what: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise error(f"{what} has the key {key!r} twice (the second would silently replace the first); "
                            f"fix the file or export it again from pruneviz")
            seen.add(key)
        return dict(pairs)
    return hook


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (never recursing deeper than ``limit``)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def strict_json(text: str | bytes, error, what: str):
    """``json.loads`` that refuses what plain parsing accepts silently: duplicate keys, nesting deeper than
    :data:`MAX_JSON_DEPTH`, numbers too large for a float or an int. Raises ``error`` (a PrunevizError class) with
    a one-line message starting with ``what``."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys(error, what))
    except RecursionError as e:
        raise error(f"{what} is nested too deeply to be a pruneviz file; load a file exported by pruneviz") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digits beyond Python's limit
        raise error(f"{what} is not valid JSON ({str(e)[:160]}); load a .json file exported by pruneviz") from e
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep, which no pruneviz file is; load a "
                    f"file exported by pruneviz")
    return data
