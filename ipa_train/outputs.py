"""Writing files safely: checks of output folders made before any work starts, atomic writes, full disks.

Every file the kit writes goes through `atomic_write` (or a folder renamed into place), so it gets the mode a
plain `open(..., "w")` would give (0666 less the umask) and a reader never sees half a file.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import IPAKitError

# ENOSPC: no space left; EDQUOT: quota exceeded; EFBIG: file too large for the file system.
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
MB = 1024 * 1024


class OutputError(IPAKitError):
    """An output folder or file cannot be written (a file in its place, read-only, no space)."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Free space of the file system `path` is (or would be created) on."""
    return shutil.disk_usage(_existing_ancestor(Path(path).absolute())).free


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder`: the only check that holds for root, ACLs and read-only mounts."""
    fd, probe = tempfile.mkstemp(prefix=".ipakit-write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0, what: str = "output folder") -> Path:
    """Make sure `path` is (or can be created as) a writable folder with `need_bytes` free; creates it.

    Raises:
        OutputError: one line naming the folder, what is wrong and what to do.
    """
    folder = Path(path)
    ancestor = _existing_ancestor(folder.absolute())
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputError(f"{what} {os.fspath(path)!r}: {os.fspath(ancestor)!r} is a file, not a folder; "
                          "remove it or choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe_writable(folder)
    except OSError as e:
        if is_disk_full(e):
            raise OutputError(f"{what} {os.fspath(path)!r}: the disk is full; free some space or choose another "
                              "output folder") from None
        raise OutputError(f"{what} {os.fspath(path)!r} cannot be written ({e.strerror or e}); choose a folder you "
                          "can write to, or fix its permissions") from None
    free = free_bytes(folder)
    if need_bytes and free < need_bytes:
        raise OutputError(f"{what} {os.fspath(path)!r}: {free / MB:.0f} MB free, this run needs about "
                          f"{need_bytes / MB:.0f} MB; free some space or choose another output folder")
    return folder


def check_output_file(path: str | os.PathLike, need_bytes: int = 0, what: str = "output file") -> Path:
    """Make sure the file `path` can be written: its folder (created if missing) is writable, it is not a folder."""
    target = Path(path)
    if not target.name or target.is_dir():
        raise OutputError(f"{what} {os.fspath(path)!r} is a folder; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{what} {os.fspath(path)!r} exists and is read-only; remove it or choose another name")
    check_output_dir(target.parent if str(target.parent) else Path("."), need_bytes, f"folder of the {what}")
    return target


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def disk_full_error(path: str | os.PathLike, what: str) -> OutputError:
    return OutputError(f"the disk is full: writing {what} {os.fspath(path)!r} failed; free some space and run again")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file in the target folder, fsync it, then rename it into place.

    On any failure the temporary file is removed and an existing file at `path` is left as it was; a full disk
    becomes one `OutputError`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; give the file the permissions of a normal write
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path, "file") from None
        raise
