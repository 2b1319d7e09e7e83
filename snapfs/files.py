"""Small file primitives every writer in snapfs uses: atomic replace, safe opens."""

import functools
import os
import re
from pathlib import Path
from typing import Any

from . import procfs

# What atomic_write names its temporary: ".<name>.tmp<pid>".
_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")

__all__ = ["atomic_write", "fsync_dir", "read_text_nofollow", "make_dirs",
           "remove_stale_temporaries", "start_writeback"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600, *,
                 durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix.

    The temporary name is created with O_EXCL|O_NOFOLLOW so a symlink planted in
    its place cannot redirect the write. ``durable=False`` skips the fsyncs, for
    runtime state on /run that a host crash wipes anyway.
    """
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def read_text_nofollow(path: Path, limit: int = 1 << 20) -> str:
    """Read a small text file, refusing symlinks and anything larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode()


def make_dirs(path: Path, mode: int) -> None:
    """``mkdir -p`` where every directory made gets ``mode`` whatever the umask
    (``Path.mkdir(parents=True)`` gives the parents the umask's mode)."""
    if path.is_dir():
        return
    make_dirs(path.parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def remove_stale_temporaries(directory: Path) -> int:
    """Remove what ``atomic_write`` calls left behind when their process was killed
    (their pid is gone); returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match and not procfs.alive(int(match[1])):
            try:
                os.unlink(directory / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range``, None where there is none: looked up on first use,
    since ctypes and libc's symbols cost start-up time that most commands never need."""
    import ctypes
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not glibc/Linux: the final fsync does it all
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk without waiting for it
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the fsync which makes a
    save image durable finds little left to write: done behind a reader that
    follows the writer, the flush overlaps the writing."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
