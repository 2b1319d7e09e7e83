"""The NBD connections to one qemu-nbd server, and reads over them.

Each server has a pool of connections (one per CPU, at most 4); the blocking
libnbd ``pread`` runs in Trio worker threads.  Reads of 2 MiB and more are
spread over the connections, in requests of at most 4 MiB.  Reads are clamped
at the end of the disk.
"""

import contextlib
import os
from pathlib import Path
from typing import Any

import trio

from .records import DiskViewError

try:  # Debian's python3-libnbd; only needed to actually open views
    import nbd
except ImportError:  # pragma: no cover - depends on the host
    nbd = None

__all__ = ["DEFAULT_HANDLES", "Pool", "close_handles", "connect", "nbd"]

DEFAULT_HANDLES = max(1, min(4, len(os.sched_getaffinity(0))))
"""NBD connections per server: reads of one snapshot in flight at once.

Measured with 4 concurrent readers on a 2-CPU machine (page cache warm): one
connection 1.0 GB/s, two 1.4-1.6 GB/s, four 1.0-1.1 GB/s -- qemu-nbd, the
kernel and the Python reader threads share the CPUs, so more connections than
CPUs only add contention.  Hence: one per CPU, at most 4."""
MAX_REQUEST = 32 << 20
"""Largest single NBD read (qemu-nbd's limit); bigger reads are split."""
REQUEST_CHUNK = 4 << 20
"""NBD request size for big reads: larger buffers only cost page faults."""
SPLIT_MIN = 1 << 20
"""Reads of at least twice this go out in parallel over several connections."""
CLUSTER = 64 << 10
"""qcow2's default cluster size: parallel parts start on cluster boundaries."""


def connect(sock: str) -> Any:
    """A new NBD connection to the server at ``sock`` (blocking: run it in a thread)."""
    h = nbd.NBD()
    h.set_handle_name("snapfs")
    h.set_pread_initialize(False)  # libnbd fills the buffer or fails
    h.connect_unix(sock)
    return h


def close_handles(handles: list[Any]) -> None:
    """Shut the connections down (blocking: run it in a thread)."""
    for h in handles:
        with contextlib.suppress(Exception):  # the server may already be gone
            h.shutdown()
    handles.clear()


class Pool:
    """The connections to one server: at most ``max_handles``, lent out per read."""

    def __init__(self, socket: Path, image: Path, tag: str, max_handles: int) -> None:
        self.socket = socket
        self.image = image
        self.tag = tag
        self.max_handles = max_handles
        self.size = 0
        self.max_request = MAX_REQUEST
        self.closed = False
        self.broken = False  # a connection to the server died
        self.free: list[Any] = []
        self.slots = trio.Semaphore(max_handles)

    def adopt(self, h: Any) -> None:
        """Take the first connection and learn the disk's size and request limit from it."""
        self.free.append(h)
        self.size = int(h.get_size())
        limit = int(h.get_block_size(nbd.SIZE_MAXIMUM) or 0)
        self.max_request = min(MAX_REQUEST, limit) if limit > 0 else MAX_REQUEST

    def close(self) -> list[Any]:
        """Refuse further reads; return the idle connections for the caller to shut."""
        self.closed = True
        handles, self.free = self.free, []
        return handles

    async def acquire(self) -> Any:
        await self.slots.acquire()
        try:
            if self.closed:
                raise DiskViewError(f"view of {self.tag!r} of {self.image} is closed")
            if self.free:
                return self.free.pop()
            return await trio.to_thread.run_sync(connect, str(self.socket))
        except BaseException as e:
            self.slots.release()
            if nbd is not None and isinstance(e, nbd.Error):
                raise DiskViewError(
                    f"cannot connect to qemu-nbd for {self.tag!r} of {self.image}: {e}"
                ) from e
            raise

    def release(self, h: Any, healthy: bool) -> None:
        # A connection not put back is closed when its last reference goes.
        if healthy and not self.closed:
            self.free.append(h)
        self.slots.release()

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) clamped to the disk; big reads go out in
        parallel over several connections."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        n = end - offset
        ways = min(self.max_handles, n // SPLIT_MIN)
        if ways < 2:
            chunks = await self.read_chunks(offset, n)
        else:
            step = -(-n // ways)
            step += -step % CLUSTER
            starts = list(range(offset, end, step))
            results: list[list[bytearray]] = [[] for _ in starts]
            errors: list[Exception] = []

            async def part(i: int, pos: int) -> None:
                try:
                    results[i] = await self.read_chunks(pos, min(step, end - pos))
                except Exception as e:  # noqa: BLE001 - re-raised below, not in an ExceptionGroup
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for i, pos in enumerate(starts):
                    nursery.start_soon(part, i, pos)
            if errors:
                raise errors[0]
            chunks = [c for r in results for c in r]
        # The only copy: libnbd's buffers into the bytes returned.
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    async def read_chunks(self, offset: int, n: int) -> list[bytearray]:
        """Read over one connection, in requests of at most REQUEST_CHUNK bytes."""
        h = await self.acquire()
        healthy = False
        try:
            chunks = []
            pos, end = offset, offset + n
            limit = min(self.max_request, REQUEST_CHUNK)
            while pos < end:
                k = min(limit, end - pos)
                chunks.append(await trio.to_thread.run_sync(h.pread, k, pos))
                pos += k
            healthy = True
            return chunks
        except nbd.Error as e:
            try:
                if h.aio_is_dead() or h.aio_is_closed():
                    self.broken = True  # the next open() starts a new server
            except nbd.Error:  # pragma: no cover
                self.broken = True
            raise DiskViewError(
                f"reading snapshot {self.tag!r} of {self.image} at {offset}: {e}"
            ) from e
        finally:
            self.release(h, healthy)
