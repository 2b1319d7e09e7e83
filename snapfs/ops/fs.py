"""The pyfuse3 adapter: FUSE requests in, ``Tree`` calls out, errnos back.

Thin on purpose: what the tree looks like is ``model.Tree``'s business. This
module keeps what only FUSE needs -- inode numbers and their lookup counts,
file and directory handles -- and turns errors into errnos in one place
(``_handler``): a ``SnapfsError`` answers its own ``errno``, anything else is
a bug, logged with its traceback and answered EIO so the mount stays up.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..config import MAX_NAME_BYTES
from ..errors import NotFound, SnapfsError
from ..tasks import cause
from .model import Node, OpenFile, Tree, TreePath

__all__ = ["Inodes", "Operations"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# The handlers that change something: their failures are news (warning)...
VERBS = frozenset({"mkdir", "rmdir", "write", "setattr", "create", "mknod", "unlink",
                   "symlink", "link", "rename", "open"})
# ...unless the tree refused them as it is meant to: backup tools and file
# managers probe (`.Trash-0`, unlinks, chmods) all the time, and a log line
# each would bury real failures. A failed lookup or getattr is routine too.
REFUSALS = frozenset({errno.EROFS, errno.EINVAL, errno.ENAMETOOLONG, errno.EEXIST,
                      errno.ENOENT, errno.EACCES})


def _handler(fn: F) -> F:
    """Answer every failure of ``fn`` with an errno; the one place errors are translated."""
    verb = fn.__name__ in VERBS

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            try:
                return await fn(self, *args)
            except BaseExceptionGroup as group:
                # Work run side by side failed: answer for the error that caused it.
                first = cause(group)
                if first is group:
                    raise
                raise first from None
        except FUSEError:
            raise
        except SnapfsError as err:
            news = verb and err.errno not in REFUSALS
            logger.log(logging.WARNING if news else logging.DEBUG, "%s: %s (%s)", fn.__name__,
                       err, errno.errorcode.get(err.errno, err.errno))
            raise FUSEError(err.errno) from None
        except Exception:
            # A bug: answer EIO rather than let pyfuse3.main() end and the mount hang.
            logger.exception("%s%r failed unexpectedly", fn.__name__, args[:3])
            raise FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


class Inodes:
    """Inode numbers for tree paths, and the kernel's lookup count of each.

    A number stays with its path while the kernel remembers it; ``forget``
    drops it when the count reaches zero (a deleted snapshot's path is only a
    name that no longer resolves, so nothing else needs freeing).
    """

    def __init__(self) -> None:
        self._paths: dict[int, TreePath] = {pyfuse3.ROOT_INODE: ()}
        self._inodes: dict[TreePath, int] = {(): pyfuse3.ROOT_INODE}
        self._counts: Counter[int] = Counter()
        self._next = itertools.count(pyfuse3.ROOT_INODE + 1)

    def __len__(self) -> int:
        return len(self._paths)

    def inode(self, path: TreePath) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = next(self._next)
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def path(self, ino: int) -> TreePath:
        try:
            return self._paths[ino]
        except KeyError:
            raise NotFound(f"inode {ino} is not known") from None

    def count(self, ino: int) -> int:
        return self._counts[ino]

    def remember(self, ino: int) -> None:
        """The kernel learned of ``ino`` (lookup, mkdir, readdirplus)."""
        self._counts[ino] += 1

    def forget(self, ino: int, n: int) -> None:
        self._counts[ino] -= n
        if self._counts[ino] <= 0:
            del self._counts[ino]
            self.drop_unused(ino)

    def drop_unused(self, ino: int) -> None:
        """Free ``ino`` unless the kernel holds it (an entry built but never sent)."""
        if ino != pyfuse3.ROOT_INODE and not self._counts[ino]:
            self._counts.pop(ino, None)
            path = self._paths.pop(ino, None)
            if path is not None:
                self._inodes.pop(path, None)


class Operations(pyfuse3.Operations):
    """The FUSE side of ``Tree``."""

    # A write to apply must reach us at once and return when the apply is done.
    enable_writeback_cache = False

    def __init__(self, tree: Tree, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.on_init = on_init
        self.inodes = Inodes()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[Node]] = {}
        self._handles = itertools.count(1)

    # -- attributes ----------------------------------------------------------

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self.inodes.inode(node.path)
        attr.generation = 0
        attr.entry_timeout = node.timeout
        attr.attr_timeout = node.timeout
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = self.tree.uid
        attr.st_gid = self.tree.gid
        attr.st_rdev = 0
        attr.st_size = node.size
        attr.st_blksize = 4096
        attr.st_blocks = node.st_blocks
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a node the kernel now knows by name: counts a lookup."""
        attr = self._attributes(node)
        self.inodes.remember(attr.st_ino)
        return attr

    # -- names ---------------------------------------------------------------

    def init(self) -> None:
        # Runs before the kernel has the answer to INIT, which would undo what
        # on_init sets up (the mount's read-ahead): it runs just after.
        if self.on_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.on_init)

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        node = await self.tree.lookup(self.inodes.path(parent_inode), name)
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Must never raise: the kernel does not wait for an answer.
        for ino, n in inode_list:
            try:
                self.inodes.forget(ino, n)
            except Exception:
                logger.exception("forget(%d, %d) failed", ino, n)

    @_handler
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attributes(await self.tree.get(self.inodes.path(inode)))

    @_handler
    async def readlink(self, inode: int, ctx: Any = None) -> Any:
        return (await self.tree.readlink(self.inodes.path(inode))).encode()

    @_handler
    async def opendir(self, inode: int, ctx: Any = None) -> Any:
        nodes = await self.tree.listdir(self.inodes.path(inode))
        fh = next(self._handles)
        self._dirs[fh] = nodes
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # The listing was taken at opendir: offsets stay valid whatever changes.
        for index, node in enumerate(self._dirs[fh][start_id:], start_id):
            attr = self._attributes(node)
            if not pyfuse3.readdir_reply(token, node.name.encode(), attr, index + 1):
                self.inodes.drop_unused(attr.st_ino)
                break
            self.inodes.remember(attr.st_ino)

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @_handler
    async def statfs(self, ctx: Any = None) -> Any:
        st = await self.tree.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = st.f_bsize, st.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        # No inode counts: the tree has no inodes to run out of (df -i shows "-").
        data.f_files, data.f_ffree, data.f_favail = 0, 0, 0
        data.f_namemax = MAX_NAME_BYTES
        return data

    # -- files ---------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        opened = await self.tree.open(self.inodes.path(inode), flags)
        fh = next(self._handles)
        self._files[fh] = opened
        return pyfuse3.FileInfo(fh=fh, direct_io=opened.direct_io, keep_cache=opened.keep_cache)

    # pyfuse3 replies with any object that has the buffer protocol: a view's
    # bytearray goes out without a copy.
    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        return await self._files[fh].reader.read(off, size)

    # Called by a pyfuse3 built with contrib/pyfuse3-lseek.patch (scripts/setup).
    @_handler
    async def lseek(self, inode: int, fh: int, off: int, whence: int, ctx: Any = None) -> int:
        return await self.tree.lseek(self._files[fh], off, whence)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.tree.write(self._files[fh], buf)

    @_handler
    async def flush(self, fh: int) -> None:
        pass

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    @_handler
    async def release(self, fh: int) -> None:
        opened = self._files.pop(fh, None)
        if opened is not None:
            await self.tree.close(opened)

    # -- verbs ---------------------------------------------------------------

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any = None) -> Any:
        return self._entry(await self.tree.mkdir(self.inodes.path(parent_inode), name))

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        await self.tree.rmdir(self.inodes.path(parent_inode), name)

    # -- everything else changes what only the verbs may change: EROFS ---------

    @_handler
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any = None) -> Any:
        path = self.inodes.path(inode)
        only_size = fields.update_size and not (fields.update_mode or fields.update_uid
                                                or fields.update_gid)
        if only_size and attr.st_size == 0:
            return self._attributes(await self.tree.truncate(path))
        what = "chmod" if fields.update_mode else "chown" if (
            fields.update_uid or fields.update_gid) else "truncate" if fields.update_size \
            else "touch"
        await self.tree.refuse(path, what)

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any = None) -> Any:
        await self._refuse_name(parent_inode, name, "create")

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any = None) -> Any:
        kind = "mkfifo" if stat.S_ISFIFO(mode) else "mknod"
        await self._refuse_name(parent_inode, name, kind)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any = None) -> Any:
        await self._refuse_name(parent_inode, name, "symlink")

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any = None) -> Any:
        await self._refuse_name(new_parent_inode, new_name, "link")

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        await self._refuse_name(parent_inode, name, "unlink")

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any = None) -> None:
        await self._refuse_name(parent_inode_old, name_old, "rename")

    async def _refuse_name(self, parent_inode: int, name: bytes, action: str) -> None:
        path = (*self.inodes.path(parent_inode), name.decode("utf-8", errors="replace"))
        await self.tree.refuse(path, action)

    # -- extended attributes: there are none ---------------------------------

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        self.inodes.path(inode)
        # ENOSYS makes the kernel answer ENOTSUP itself from now on, without asking:
        # `ls -l` asks for an SELinux label and two ACLs per entry, 3,000 round
        # trips for 1,000 snapshots (145 ms of it), then none.
        raise FUSEError(errno.ENOSYS)

    @_handler
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        self.inodes.path(inode)
        return []

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        self.inodes.path(inode)
        raise FUSEError(errno.ENOTSUP)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        self.inodes.path(inode)
        raise FUSEError(pyfuse3.ENOATTR)
