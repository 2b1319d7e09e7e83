"""Save images' bytes: hashed while QEMU writes them, checked again only when
changed, read from trio without blocking it.

Apart from ``store`` (the info files, which say what a snapshot is), so that
what only lists snapshots needs neither OpenSSL's hashes nor trio.
"""

import hashlib
import json
import os
import threading
from pathlib import Path

import trio

from .errors import NotFound
from .files import atomic_write, read_text_nofollow, start_writeback

__all__ = ["sha256_file", "GrowingHash", "CheckedSaves", "FileReader"]


def sha256_file(path: Path, writeback: bool = False) -> tuple[int, str]:
    """Size and sha256 of a file, read in large blocks (blocking: call from a thread);
    with ``writeback``, its dirty pages are sent to disk behind the read."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            if writeback:
                start_writeback(f.fileno(), size, n)
            size += n
    return size, digest.hexdigest()


class GrowingHash:
    """sha256 of a file read while another process still writes it (a save image
    QEMU is writing), so the hash is ready moments after the last byte lands
    instead of costing a second pass over the file; what it has read is sent to
    disk meanwhile, so the closing fsync is short."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._written = threading.Event()
        self._stop = False
        self._result: tuple[int, str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="snapfs-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        digest = hashlib.sha256()
        size = 0
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        try:
            with open(self._path, "rb", buffering=0) as f:
                while not self._stop:
                    # Whatever is read after ``written`` was set is the end.
                    last = self._written.is_set()
                    n = f.readinto(buf)
                    if n:
                        digest.update(view[:n])
                        start_writeback(f.fileno(), size, n)
                        size += n
                    elif last:
                        self._result = (size, digest.hexdigest())
                        return
                    else:
                        self._written.wait(0.005)
        except BaseException as err:  # handed to result()
            self._error = err

    def result(self) -> tuple[int, str]:
        """Size and sha256, once the writer is done (blocking: call from a thread)."""
        self._written.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self._stop = True
        self._written.set()
        self._thread.join()


class CheckedSaves:
    """Save images whose sha256 was checked since boot, by what their file is.

    Hashing a save image takes as long as QEMU takes to load it, and a rig that
    reverts many times a day applies the same snapshots again and again. An
    image is hashed again only if it is not the same file, untouched, as when it
    was last checked or written: any write, truncation or replacement through the
    file system changes its inode, size, mtime or ctime. (What this cannot see
    is the disk itself flipping bits under an unchanged file; the list lives in
    the run dir, so each boot starts it over.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, list[object]]:
        try:
            data = json.loads(read_text_nofollow(self.path))
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _identity(save: Path, sha256: str) -> list[object] | None:
        try:
            st = os.stat(save, follow_symlinks=False)
        except OSError:
            return None
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256]

    def holds(self, save: Path, sha256: str) -> bool:
        """Whether ``save`` is unchanged since it was found to have ``sha256``."""
        identity = self._identity(save, sha256)
        return identity is not None and self._load().get(str(save)) == identity

    def add(self, save: Path, sha256: str) -> None:
        identity = self._identity(save, sha256)
        if identity is None:
            return
        known = {k: v for k, v in self._load().items() if os.path.exists(k)}
        known[str(save)] = identity
        try:
            atomic_write(self.path, json.dumps(known), mode=0o600, durable=False)
        except OSError:
            pass  # it only saves time


class FileReader:
    """A stored file (a save image) opened once; each read is a ``pread`` in a worker
    thread, so a big read never holds up the trio loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    async def open(cls, path: Path) -> "FileReader":
        """:raise NotFound: when the file is gone."""
        try:
            fd = await trio.to_thread.run_sync(
                os.open, path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"{path.name} is gone") from None
        return cls(fd)

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset)

    async def aclose(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            await trio.to_thread.run_sync(os.close, fd)
