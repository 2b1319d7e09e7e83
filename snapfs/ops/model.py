"""What the snapshot tree looks like, and its verbs: ``Tree`` over the engine's ``Queries``.

This package's model, and only it, says what a domain and its snapshots look
like as files: ``kinds`` holds the table of every path and how each kind of
node is stat'ed, listed and opened (made of ``nodes``' records), ``render``
the generated files' bytes.
``Tree`` answers requests by path through that table and keeps what only the
kernel's view needs: which files are open (an open file holds up the rmdir
of its snapshot) and which version of each file the kernel may have cached.
It keeps no data: every fact is asked of ``Queries`` (the engine, or a fake
in the unit tests), which owns the caches. ``ops/fs.py`` only translates FUSE
requests into calls of ``Tree``; nothing here knows about inodes.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from dataclasses import dataclass

import trio

from ..config import check_snapshot_name
from ..errors import Busy, NotFound, SnapfsError, StateError
from .kinds import TABLE
from .nodes import FRESH, At, Node, TreePath
from .queries import Queries, Readable

__all__ = ["FRESH", "RELEASE_GRACE", "NoData", "Node", "OpenFile", "ReadOnly", "Tree",
           "TreePath"]

# ``rmdir`` of a snapshot whose files are open is refused, but the kernel
# sends RELEASE only after close() has returned: let a ``cp -a src && rmdir
# src`` through by waiting this long for the handles to go.
RELEASE_GRACE = 1.0


class ReadOnly(SnapfsError):
    """A change the tree has no verb for: a write, create, unlink, chmod..."""

    errno = errno.EROFS


class NoData(SnapfsError):
    """``lseek`` for data past the last byte of data."""

    errno = errno.ENXIO


@dataclass
class OpenFile:
    """A file opened through the tree."""

    node: Node
    reader: Readable
    direct_io: bool = False     # content may change between reads: bypass the page cache
    keep_cache: bool = False    # same bytes as the last open: the kernel may keep its pages
    holder: TreePath = ()       # the snapshot directory that may not be removed meanwhile


def _decode(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound(f"no entry {name!r}") from None


def _show(path: TreePath) -> str:
    return "/".join(path)


class Tree:
    """The mounted tree over ``queries``.

    Every method takes paths (tuples of names) and raises ``SnapfsError``
    subclasses, whose ``errno`` is the answer; a change the tree refuses on
    a domain is also recorded as that domain's ``last_error``.
    """

    def __init__(self, queries: Queries, *, uid: int | None = None,
                 gid: int | None = None) -> None:
        self.queries = queries
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.started_ns = time.time_ns()
        self._open: Counter[TreePath] = Counter()   # open files by the directory they hold
        self._released = trio.Event()
        self._cached: dict[TreePath, str] = {}      # the version the kernel may have cached

    def _at(self, path: TreePath) -> At:
        return TABLE.resolve(self.queries, path, self.started_ns)

    # -- what is there -----------------------------------------------------

    async def get(self, path: TreePath) -> Node:
        """The node at ``path``. :raise NotFound: when there is none (any more)."""
        at = self._at(path)
        return await at.kind.stat(at)

    async def lookup(self, parent: TreePath, name: bytes) -> Node:
        return await self.get((*parent, _decode(name)))

    async def listdir(self, path: TreePath) -> list[Node]:
        """The entries of directory ``path``, in a stable order."""
        at = self._at(path)
        if not (await at.kind.stat(at)).is_dir:
            raise StateError(f"{_show(path)} is not a directory")
        return await at.entries()

    async def readlink(self, path: TreePath) -> str:
        at = self._at(path)
        await at.kind.stat(at)
        if at.kind.target is None:
            raise StateError(f"{_show(path)} is not a symbolic link")
        return at.kind.target(at)

    async def statfs(self) -> os.statvfs_result:
        """The state dir's file system: where save images take space."""
        await trio.lowlevel.checkpoint()
        return self.queries.statfs()

    # -- open files ----------------------------------------------------------

    async def open(self, path: TreePath, flags: int) -> OpenFile:
        """Open a file; only ``apply`` may be opened for writing."""
        at = self._at(path)
        node = await at.kind.stat(at)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if node.is_dir:
            raise StateError(f"{_show(path)} is a directory")
        if writing and at.kind.write is None:
            raise self._refused(path, "write", "only apply can be written")
        if at.kind.open is None:
            raise StateError(f"{_show(path)} is a symbolic link")
        opening = await at.kind.open(at, node)
        keep = opening.version is not None and self._same_as_cached(path, opening.version)
        opened = OpenFile(node, opening.reader, direct_io=opening.direct_io, keep_cache=keep,
                          holder=TABLE.holder(path))
        self._open[opened.holder] += 1
        return opened

    def _same_as_cached(self, path: TreePath, version: str) -> bool:
        """True when the kernel's pages of ``path`` (if any) hold this version."""
        same = self._cached.get(path) == version
        self._cached[path] = version
        return same

    async def lseek(self, opened: OpenFile, offset: int, whence: int) -> int:
        """SEEK_DATA or SEEK_HOLE in an open file: a disk view answers from its
        snapshot's allocation, so sparse-aware tools skip what reads as zeros;
        any other file is data from start to end."""
        seek = getattr(opened.reader, "seek", None)
        if seek is not None:
            result: int = await seek(offset, whence)
            return result
        await trio.lowlevel.checkpoint()
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise StateError(f"lseek whence {whence}")
        if offset >= opened.node.size:
            raise NoData(f"lseek past the end of {_show(opened.node.path)}")
        return offset if whence == os.SEEK_DATA else opened.node.size

    async def close(self, opened: OpenFile) -> None:
        self._open[opened.holder] -= 1
        if self._open[opened.holder] <= 0:
            del self._open[opened.holder]
        self._released.set()
        self._released = trio.Event()
        await opened.reader.aclose()

    async def _wait_closed(self, holder: TreePath, what: str) -> None:
        with trio.move_on_after(RELEASE_GRACE):
            while self._open[holder]:
                await self._released.wait()
        if self._open[holder]:
            raise self._fail(holder[0], Busy(f"{what}: {self._open[holder]} of its files "
                                             "are open; close them first"))

    # -- verbs ---------------------------------------------------------------

    def _fail(self, dom: str, err: SnapfsError) -> SnapfsError:
        """Record a verb's failure the tree itself finds as the domain's last_error."""
        self.queries.record_error(dom, str(err))
        return err

    # A change the tree has no verb for, or a name it cannot take, is refused with
    # its errno only: backup tools and file managers probe (a `.Trash-0`, an
    # unlink, a chmod) all the time, and last_error is for real failures.

    def _refused(self, path: TreePath, action: str, why: str) -> SnapfsError:
        return ReadOnly(f"{action} {_show(path) or '/'}: read-only ({why})")

    def _new_name(self, parent: TreePath, name: bytes, what: str) -> str:
        try:
            return check_snapshot_name(name)
        except SnapfsError as err:
            raise type(err)(f"{what} in {_show(parent)}: {err}") from None

    async def mkdir(self, parent: TreePath, name: bytes) -> Node:
        """``mkdir <dom>/<name>``: VM snapshot; ``mkdir <dom>/.disk/<tag>``: disk snapshot."""
        at = self._at(parent)
        if at.kind.create is not None:
            new = self._new_name(parent, name, "mkdir")
            await at.kind.create(at, new)
            return await self.get((*parent, new))
        await at.kind.stat(at)
        where = ("domains are defined with `snapfs domain define`" if not parent else
                 "snapshots are made in a domain directory or in its .disk directory")
        raise self._refused((*parent, name.decode(errors="replace")), "mkdir", where)

    async def rmdir(self, parent: TreePath, name: bytes) -> None:
        """``rmdir <dom>/<name>``, ``rmdir <dom>/.disk/<tag>``: delete that snapshot."""
        path = (*parent, _decode(name))
        at = self._at(path)
        await at.kind.stat(at)
        if at.kind.delete is None:
            raise self._refused(path, "rmdir", "only snapshot directories can be removed")
        await self._wait_closed(path, f"rmdir {_show(path)}")
        try:
            await at.kind.delete(at)
        finally:
            # What the kernel cached under the removed name is gone with it
            # (the name may be taken again); a long mount must not keep a
            # version per file of every snapshot it ever saw deleted.
            for cached in [p for p in self._cached if p[:len(path)] == path]:
                del self._cached[cached]

    async def write(self, opened: OpenFile, data: bytes) -> int:
        """A write to a verb file (``apply``); returns when the verb is done."""
        path, kind = opened.node.path, opened.node.kind
        if kind.write is None:
            raise self._refused(path, "write", "only apply can be written")
        await kind.write(self._at(path), data)
        return len(data)

    async def refuse(self, path: TreePath, action: str) -> None:
        """Any change without a verb: EROFS, and the reason in ``.status``."""
        raise self._refused(path, action, "the snapshot tree changes only through "
                            "mkdir, rmdir and writes to apply")

    async def truncate(self, path: TreePath) -> Node:
        """Truncation to zero: a no-op on ``apply`` (``echo running > apply`` may ask it)."""
        at = self._at(path)
        node = await at.kind.stat(at)
        if at.kind.write is None:
            await self.refuse(path, "truncate")
        return node
