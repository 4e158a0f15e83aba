"""Atomic writes: an interrupted save never leaves a file or folder that looks complete.

Every writer here works in a hidden temporary beside its target and puts it in place with one
rename, so a reader sees the previous content or the new one, never a mix, and a writer killed
outright (``SIGKILL``, power loss) leaves the previous content in place. What such a writer leaves
behind (its hidden temporaries, named after its process id) is removed once that process is gone:
by the next write of the same folder (:func:`atomic_directory`), or by the first write of a later
process into the same folder (:func:`atomic_file`).

Folders and files are created with the permissions the process's umask allows (``0o777 & ~umask``
for folders, ``0o666 & ~umask`` for files), as ``mkdir`` and ``open`` would create them, not the
owner-only ones of ``tempfile``.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_file",
    "atomic_write_text",
    "recover_directory",
    "save_image",
    "write_json",
]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    """The process id in a temporary's name ``<prefix><pid>-<random>``; ``None`` when there is none."""
    try:
        return int(name[len(prefix) :].split("-", 1)[0])
    except ValueError:
        return None


def _abandoned(name: str, prefix: str) -> bool:
    """Whether the temporary ``name`` belongs to a writer that is gone (or names none)."""
    pid = _writer_pid(name, prefix)
    return pid is None or (pid != os.getpid() and not _pid_alive(pid))


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, the only portable way)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------- exchanging two folders


def _load_exchange() -> Any:
    """The C function that swaps two paths in one step, with its flag; ``None`` where there is none."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd, rename_exchange = -100, 2
            return lambda a, b: function(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL(None, use_errno=True).renamex_np
            function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rename_swap = 2
            return lambda a, b: function(a, b, rename_swap)
    return None


_EXCHANGE = _load_exchange()
#: What the exchange fails with where the file system cannot do it.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step.

    Linux's ``renameat2(RENAME_EXCHANGE)`` or macOS's ``renamex_np(RENAME_SWAP)``. ``False`` when
    neither the system nor the file system supports it (nothing was changed then).

    Raises:
        OSError: When the system refuses the swap for another reason (permissions, ...).
    """
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    error = ctypes.get_errno()
    if error in _UNSUPPORTED:
        return False
    raise OSError(error, os.strerror(error), os.fspath(a), None, os.fspath(b))


def recover_directory(path: str | os.PathLike[str]) -> None:
    """Repair what writers of :func:`atomic_directory` killed outright left beside ``path``.

    - ``path`` missing but a backup ``.NAME.old-PID-*`` of a writer that is gone: the writer was
      killed between moving the previous folder aside and moving the new one in (systems without
      an atomic exchange of two folders); the backup is moved back to ``path``.
    - Backups of writers that are gone, once ``path`` exists, and their hidden ``.NAME.partial-PID-*``
      folders (unfinished new content, or previous content swapped out and not yet deleted) are
      deleted. What belongs to a writer still running is left alone.

    :func:`atomic_directory` calls this before it writes; call it before reading ``path`` when a
    writer may have been killed on a system without an atomic exchange.
    """
    target = Path(path)
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return
    backup_prefix, partial_prefix = f".{name}.old-", f".{name}.partial-"
    backups = [p for p in parent.glob(f"{backup_prefix}*") if _abandoned(p.name, backup_prefix)]
    if not os.path.lexists(target) and backups:
        newest = max(backups, key=lambda p: p.stat().st_mtime_ns)
        with contextlib.suppress(OSError):  # a folder with content appeared meanwhile: it stays
            os.rename(newest, target)
            backups.remove(newest)
    if os.path.lexists(target):  # only delete a backup once a folder is in place
        for backup in backups:
            _remove(backup)
    for partial in parent.glob(f"{partial_prefix}*"):
        if _abandoned(partial.name, partial_prefix):
            _remove(partial)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one step.

    ``path`` is a new path or an existing folder (a symbolic link is followed); whatever was in
    that folder is replaced as a whole. The new folder takes the permissions of the umask.

    On any exception (or ``KeyboardInterrupt``) the temporary folder is removed and ``path`` keeps
    its previous content. A writer killed outright at any moment leaves ``path`` with its previous
    content or its new one, never without a folder, on systems that swap two folders atomically
    (Linux's ``renameat2``, macOS's ``renamex_np``); elsewhere the previous folder is moved aside
    and the new one moved in, and a writer killed between the two leaves a ``.NAME.old-PID-*``
    backup that :func:`recover_directory` (run by the next write) puts back. Leftovers of killed
    writers are removed by the next write to ``path``.

    Raises:
        NotADirectoryError: When ``path`` exists and is not a folder, or a parent of it is a file.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise NotADirectoryError(f"{os.fspath(path)!r}: a parent of it is a file, not a folder.") from error
    recover_directory(target)
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{os.fspath(path)!r} exists and is not a folder; it is not replaced.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=parent))
    backup: Path | None = None
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if not os.path.lexists(target):
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # it now holds the previous content
        else:
            backup = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        if backup is not None and backup.exists() and not os.path.lexists(target):
            os.replace(backup, target)  # interrupted between the two renames: put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- files


#: Folders whose abandoned temporary files this process has removed (once each: a folder of many files
#: is listed once, not at every write).
_SWEPT: set[str] = set()


def _temporary_file_pid(name: str) -> int | None:
    """The writer's process id in an :func:`atomic_file` temporary ``.NAME.PID-RANDOM.tmp``; ``None`` for others."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    _, dot, tail = name[: -len(".tmp")].rpartition(".")
    pid, dash, _ = tail.partition("-")
    return int(pid) if dot and dash and pid.isdigit() else None


def _sweep_abandoned_files(folder: Path) -> None:
    """Delete, once per folder and process, the temporaries of :func:`atomic_file` writers that are gone."""
    key = os.path.realpath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    with os.scandir(folder) as entries:
        for entry in entries:
            pid = _temporary_file_pid(entry.name)
            if pid is not None and pid != os.getpid() and not _pid_alive(pid) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a handle on a temporary file beside ``path`` that replaces ``path`` in one rename.

    The data is flushed to disk before the rename; on any exception the temporary file is removed
    and ``path`` keeps its previous content. The file takes the permissions of the umask. The
    temporary (``.NAME.PID-*.tmp``) of a writer killed outright is removed by the first write of a
    later process into the same folder.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned_files(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def save_image(image: Any, path: str | os.PathLike[str], format: str = "PNG") -> Path:
    """Save a PIL image atomically (never a half-written file under ``path``)."""
    with atomic_file(path, "wb") as handle:
        image.save(handle, format=format)
    return Path(path)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities) in it replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write ``data`` as indented JSON with sorted keys.

    The file is always valid JSON: JSON has no literal for NaN or the infinities, so a non-finite
    float anywhere in ``data`` (a diverged loss, an undefined score) is written as ``null``.

    Raises:
        TypeError: For a value JSON cannot represent (as ``json.dumps``); nothing is written then.
    """
    text = json.dumps(_json_safe(data), indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")
