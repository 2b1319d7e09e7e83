"""What the snapshot tree looks like: names, attributes and contents (DESIGN §4).

This module, and only this one, says what a domain and its snapshots look like
as files; ``ops/fs.py`` only translates FUSE requests into calls of ``Tree``.
Nothing here knows about inodes or the kernel, so the mapping is tested by
calling ``Tree`` directly.

A node is named by its path, a tuple of names below the mount point::

    ()                                  ROOT            one directory per domain
    (dom,)                              DOMAIN
    (dom, ".status")                    STATUS          generated, never cached
    (dom, ".current")                   CURRENT         symlink to a snapshot name
    (dom, ".disk")                      DISK_SNAPSHOTS  one directory per disk snapshot tag
    (dom, ".disk", tag)                 DISK_TAG
    (dom, ".disk", tag, "info")         DISK_INFO
    (dom, ".disk", tag, dev + ".raw")   DISK_VIEW       the disk at that snapshot, raw
    (dom, name) / (dom, ".undo")        SNAPSHOT
    (dom, name, "snapshotdata.xl")      SNAPSHOT_XL
    (dom, name, "info.json")            INFO_JSON
    (dom, name, "config.toml")          CONFIG
    (dom, name, "save")                 SAVE            the stored file's bytes
    (dom, name, "disks")                DISKS           one view per disk
    (dom, name, "disks", dev + ".raw")  DISK_VIEW
    (dom, name, "apply")                APPLY           write-only verb

What a path *can* be follows from its shape alone (``_shape``); whether it
exists is asked of the engine each time, so another process's changes show
at once. Reads go through a ``Reader``: generated files are rendered once at
open, the save image is read with ``pread`` in a worker thread, a disk view
reads the internal snapshot through the mount's ``DiskViews`` (qemu-nbd), so
it shows the disk as it was while the domain runs and writes on.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..config import DOMAIN_NAME, check_snapshot_name
from ..diskview import DiskView, DiskViewError, DiskViews
from ..engine import DomainStatus, Engine, Progress
from ..errors import Busy, NotFound, QemuError, SnapfsError, StateError
from ..images import DiskSnapshot, stable_info
from ..store import UNDO, Store, VmSnapshot, format_info

__all__ = ["Tree", "Node", "Kind", "OpenFile", "Reader", "ReadOnly", "TreePath", "FRESH"]

logger = logging.getLogger(__name__)

TreePath = tuple[str, ...]

# How long the kernel may trust a name or an attribute. The CLI (another
# process) changes the tree behind the kernel's back: its changes must show
# within a second.
FRESH = 0.5
# ``rmdir`` of a snapshot whose files are open is refused, but the kernel
# sends RELEASE only after close() has returned: let a ``cp -a src && rmdir
# src`` through by waiting this long for the handles to go.
RELEASE_GRACE = 1.0
# How old the store dir's mtime must be for a snapshot list read after it to be
# kept as long as the mtime stays the same (more than FRESH, the engine's own
# bound on its list's age, plus the file system's timestamp granularity).
SETTLED = 1.0
# config.toml files kept read (a few KiB each); the cache starts again past this.
CONFIG_CACHE_MAX = 10_000

STATUS, CURRENT, DISK_DIR, INFO = ".status", ".current", ".disk", "info"
SNAPSHOT_XL, INFO_JSON, CONFIG, SAVE, DISKS, APPLY = (
    "snapshotdata.xl", "info.json", "config.toml", "save", "disks", "apply")
VIEW_SUFFIX = ".raw"


class ReadOnly(SnapfsError):
    """A change the tree has no verb for (DESIGN §4: write, create, unlink, chmod...)."""

    errno = errno.EROFS


class Kind(enum.Enum):
    ROOT = "root"
    DOMAIN = "domain"
    STATUS = "status"
    CURRENT = "current"
    DISK_SNAPSHOTS = "disk snapshots"
    DISK_TAG = "disk snapshot"
    DISK_INFO = "disk snapshot info"
    SNAPSHOT = "snapshot"
    SNAPSHOT_XL = "info file"
    INFO_JSON = "info.json"
    CONFIG = "config"
    SAVE = "save image"
    DISKS = "disk views"
    DISK_VIEW = "disk view"
    APPLY = "apply"


SNAPSHOT_FILES = {SNAPSHOT_XL: Kind.SNAPSHOT_XL, INFO_JSON: Kind.INFO_JSON,
                  CONFIG: Kind.CONFIG, SAVE: Kind.SAVE, DISKS: Kind.DISKS, APPLY: Kind.APPLY}
DOMAIN_ENTRIES = {STATUS: Kind.STATUS, CURRENT: Kind.CURRENT, DISK_DIR: Kind.DISK_SNAPSHOTS}
DIR_MODE = stat.S_IFDIR | 0o555
VERB_DIR_MODE = stat.S_IFDIR | 0o755       # mkdir/rmdir are verbs here
FILE_MODE = stat.S_IFREG | 0o444
SECRET_MODE = stat.S_IFREG | 0o400         # guest memory, guest disks
APPLY_MODE = stat.S_IFREG | 0o200
LINK_MODE = stat.S_IFLNK | 0o777


@dataclass(frozen=True)
class Node:
    """One name in the tree and what ``stat`` says about it."""

    path: TreePath
    kind: Kind
    mode: int
    size: int = 0
    mtime_ns: int = 0
    nlink: int = 1
    blocks: int = -1            # 512-byte blocks; -1: as many as ``size`` needs
    timeout: float = FRESH      # seconds the kernel may keep this name and its attributes

    @property
    def name(self) -> str:
        return self.path[-1] if self.path else ""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def st_blocks(self) -> int:
        return self.blocks if self.blocks >= 0 else (self.size + 511) // 512


class Reader(Protocol):
    """An open file's bytes (``diskview.DiskView`` is one)."""

    async def read(self, offset: int, size: int) -> bytes: ...

    async def aclose(self) -> None: ...


class BytesReader:
    """Generated content, rendered once at open so every read sees one version."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[offset:offset + size]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FileReader:
    """A stored file, opened once; each read is a ``pread`` in a worker thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    async def open(cls, path: Path) -> FileReader:
        fd = await trio.to_thread.run_sync(
            os.open, path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        return cls(fd)

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset)

    async def aclose(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            await trio.to_thread.run_sync(os.close, fd)


class ViewReader:
    """A disk view; a failed read is EIO with qemu-nbd's reason, not a bug in the tree."""

    def __init__(self, view: DiskView) -> None:
        self.view = view

    async def read(self, offset: int, size: int) -> bytes:
        try:
            return await self.view.read(offset, size)
        except DiskViewError as err:
            raise QemuError(str(err)) from err

    async def aclose(self) -> None:
        await self.view.aclose()


@dataclass(frozen=True)
class _Disks:
    """What ``qemu-img info -U`` says about a domain's disks, read together."""

    tags: dict[str, list[DiskSnapshot]]     # tag -> its snapshot on each disk, in disk order
    sizes: dict[str, tuple[int, int]]       # dev -> (virtual size, bytes the image takes)


@dataclass
class OpenFile:
    """A file opened through the tree."""

    node: Node
    reader: Reader
    direct_io: bool = False     # content may change between reads: bypass the page cache
    keep_cache: bool = False    # same bytes as the last open: the kernel may keep its pages
    holder: TreePath = ()       # the snapshot directory that may not be removed meanwhile


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _shape(path: TreePath) -> Kind | None:
    """What ``path`` would be, from its names alone; None when it can be nothing."""
    depth = len(path)
    if depth == 0:
        return Kind.ROOT
    if depth == 1:
        return Kind.DOMAIN
    entry = path[1]
    if entry in DOMAIN_ENTRIES:
        if depth == 2:
            return DOMAIN_ENTRIES[entry]
        if entry == DISK_DIR and depth == 3:
            return Kind.DISK_TAG
        if entry == DISK_DIR and depth == 4:
            return Kind.DISK_INFO if path[3] == INFO else _view_shape(path[3])
        return None
    if entry.startswith(".") and entry != UNDO:
        return None
    if depth == 2:
        return Kind.SNAPSHOT
    if depth == 3:
        return SNAPSHOT_FILES.get(path[2])
    if depth == 4 and path[2] == DISKS:
        return _view_shape(path[3])
    return None


def _view_shape(name: str) -> Kind | None:
    return Kind.DISK_VIEW if name.endswith(VIEW_SUFFIX) and len(name) > len(VIEW_SUFFIX) \
        else None


def _holder(path: TreePath) -> TreePath:
    """The directory whose removal an open file of ``path`` holds up."""
    if len(path) >= 3 and path[1] == DISK_DIR:
        return path[:3]
    return path[:2] if len(path) >= 3 else ()


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written, replaced or resized; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _decode(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound(f"no entry {name!r}") from None


def _clock(sec: int, nsec: int) -> str:
    return f"{sec // 3600:04d}:{sec // 60 % 60:02d}:{sec % 60:02d}.{nsec // 1_000_000:03d}"


def _local_time(sec: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))


def render_status(status: DomainStatus) -> str:
    """``.status``: one ``key: value`` line each, ``-`` for nothing."""
    return "".join(f"{key}: {value or '-'}\n" for key, value in (
        ("domain", status.name),
        ("state", status.state),
        ("current", status.current),
        ("operation", _render_operation(status.operation)),
        ("last_error", status.last_error),
    ))


def _render_operation(op: Progress | None) -> str:
    if op is None:
        return ""
    text = op.operation + (f" ({op.phase})" if op.phase else "")
    if op.total:
        text += f" {100 * op.done // op.total}% ({op.done} of {op.total} bytes)"
    if op.started:
        text += f" since {_local_time(op.started)}"
    return text + (f" pid {op.pid}" if op.pid else "")


def render_info_json(snap: VmSnapshot, disk_snapshots: list[DiskSnapshot]) -> str:
    """``info.json``: the facts of ``vm-snapshot-list --json`` plus the disk snapshots."""
    facts = {**asdict(snap), "save": str(snap.save) if snap.save else None,
             "disk_tag": snap.disk_tag,
             "disk_snapshots": [asdict(s) for s in disk_snapshots if s.tag == snap.disk_tag]}
    return json.dumps(facts, indent=2) + "\n"


def render_disk_info(snaps: list[DiskSnapshot]) -> str:
    """``.disk/<tag>/info``: the columns of ``disk-snapshot-list``, one line per disk."""
    rows = [["DISK", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK"]]
    rows += [[s.dev, s.id, s.tag, str(s.vm_state_size), _local_time(s.date_sec),
              _clock(s.vm_clock_sec, s.vm_clock_nsec)] for s in snaps]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def _disk_tag_ok(tag: str) -> bool:
    # qemu-img can make tags that cannot be file names; they stay out of the tree.
    return tag not in ("", ".", "..") and "/" not in tag and "\0" not in tag


class Tree:
    """The tree of DESIGN §4 over an ``Engine``.

    Every method takes paths (tuples of names) and raises ``SnapfsError``
    subclasses, whose ``errno`` is the answer; a refused change on a domain is
    also recorded as that domain's ``last_error``. Disk views are opened
    through ``views``, which the mount sets for as long as it serves.
    """

    def __init__(self, engine: Engine, *, uid: int | None = None, gid: int | None = None,
                 views: DiskViews | None = None) -> None:
        self.engine = engine
        self.views = views
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.started_ns = time.time_ns()
        self._domains_dir = str(engine.dirs.domains)
        # By domain: (when read, the disk files' stat keys, whether settled, disks).
        self._disks: dict[str, tuple[float, tuple[tuple[int, int, int] | None, ...], bool,
                                     _Disks]] = {}
        self._open: Counter[TreePath] = Counter()
        self._released = trio.Event()
        self._cached: dict[TreePath, str] = {}
        # The engine's snapshot list by domain: (store dir mtime, when read, whether
        # that mtime is settled, snapshots by name), so a lookup is a stat and a
        # dict lookup, not a worker thread.
        self._snaps: dict[str, tuple[int, float, bool, dict[str, VmSnapshot]]] = {}
        self._store_dirs: dict[str, str] = {}     # domain uuid -> its store dir
        # A snapshot's config.toml, read once: (the snapshot it was read for, bytes).
        self._configs: dict[TreePath, tuple[VmSnapshot, bytes]] = {}
        self._builders: dict[Kind, Callable[[TreePath], Awaitable[Node]]] = {
            Kind.ROOT: self._root, Kind.DOMAIN: self._domain, Kind.STATUS: self._status,
            Kind.CURRENT: self._current, Kind.DISK_SNAPSHOTS: self._disk_snapshots,
            Kind.DISK_TAG: self._disk_tag, Kind.DISK_INFO: self._generated,
            Kind.SNAPSHOT: self._snapshot_dir, Kind.SNAPSHOT_XL: self._generated,
            Kind.INFO_JSON: self._generated, Kind.CONFIG: self._generated,
            Kind.SAVE: self._save, Kind.DISKS: self._disks_dir,
            Kind.DISK_VIEW: self._disk_view, Kind.APPLY: self._apply,
        }

    # -- what is there -----------------------------------------------------

    async def get(self, path: TreePath) -> Node:
        """The node at ``path``. :raise NotFound: when there is none (any more)."""
        kind = _shape(path)
        if kind is None or (path and not self._domain_exists(path[0])):
            raise NotFound(f"no entry {'/'.join(path)!r} in the tree")
        return await self._builders[kind](path)

    def _domain_exists(self, name: str) -> bool:
        """``name in engine.domain_names()``, without listing the domains dir."""
        return DOMAIN_NAME.fullmatch(name) is not None and \
            os.path.exists(f"{self._domains_dir}/{name}.toml")

    async def lookup(self, parent: TreePath, name: bytes) -> Node:
        return await self.get((*parent, _decode(name)))

    async def listdir(self, path: TreePath) -> list[Node]:
        """The entries of directory ``path``, in a stable order."""
        node = await self.get(path)
        if not node.is_dir:
            raise StateError(f"{'/'.join(path)} is not a directory")
        names: list[str]
        snapshots: list[Node] = []
        if node.kind is Kind.ROOT:
            names = self.engine.domain_names()
        elif node.kind is Kind.DOMAIN:
            names = [STATUS, CURRENT, DISK_DIR, UNDO]
            snapshots = [self._snapshot_node((*path, s.name), s)
                         for s in (await self._snapshot_map(path[0])).values()]
        elif node.kind is Kind.DISK_SNAPSHOTS:
            names = sorted(await self._disk_table(path[0]))
        elif node.kind is Kind.DISK_TAG:
            names = [INFO] + await self._view_names(path[0], path[2])
        elif node.kind is Kind.DISKS:
            snap = await self._vm_snapshot(path)
            names = await self._view_names(path[0], snap.disk_tag)
        else:
            # A snapshot's files, all from the one snapshot read here.
            snap = await self._vm_snapshot(path)
            names = [SNAPSHOT_XL, INFO_JSON, CONFIG] + ([SAVE] if snap.save else []) + \
                [DISKS, APPLY]
            files = []
            for name in names:
                try:
                    files.append(await self._snapshot_file((*path, name), snap))
                except NotFound:
                    continue  # the save image removed since the listing
            return files
        nodes = []
        for name in names:
            try:
                nodes.append(await self.get((*path, name)))
            except NotFound:
                continue  # .current or .undo absent, or deleted since the listing
        return nodes + snapshots

    async def readlink(self, path: TreePath) -> str:
        node = await self.get(path)
        if node.kind is not Kind.CURRENT:
            raise StateError(f"{'/'.join(path)} is not a symbolic link")
        return await self._current_name(path[0])

    async def statfs(self) -> os.statvfs_result:
        """The state dir's file system: where save images take space."""
        state = self.engine.dirs.state
        return await trio.to_thread.run_sync(os.statvfs, state if state.exists() else "/")

    # -- builders, one per kind ----------------------------------------------

    def _dir(self, path: TreePath, kind: Kind, mtime_ns: int, subdirs: int = 0,
             mode: int = DIR_MODE) -> Node:
        return Node(path, kind, mode, mtime_ns=mtime_ns, nlink=2 + subdirs)

    async def _root(self, path: TreePath) -> Node:
        try:
            mtime = (await trio.to_thread.run_sync(self.engine.dirs.domains.stat)).st_mtime_ns
        except OSError:
            mtime = self.started_ns
        return self._dir(path, Kind.ROOT, mtime, len(self.engine.domain_names()))

    async def _domain(self, path: TreePath) -> Node:
        dom = path[0]
        snaps = list((await self._snapshot_map(dom)).values())
        undo = await self._undo(dom)
        try:
            defined = (await trio.to_thread.run_sync(
                (self.engine.dirs.domains / f"{dom}.toml").stat)).st_mtime_ns
        except OSError:
            raise NotFound(f"no domain named {dom!r}") from None
        newest = max([_ns(s.creation_time) for s in snaps] + [defined])
        return self._dir(path, Kind.DOMAIN, newest, len(snaps) + 1 + (undo is not None),
                         mode=VERB_DIR_MODE)

    async def _status(self, path: TreePath) -> Node:
        data = render_status(await self.engine.domain_status(path[0])).encode()
        return Node(path, Kind.STATUS, FILE_MODE, size=len(data), mtime_ns=time.time_ns(),
                    timeout=0)

    async def _current(self, path: TreePath) -> Node:
        current = await self._current_name(path[0])
        if not current:
            raise NotFound(f"domain {path[0]!r} has no current snapshot")
        mtime = self.started_ns
        if current != UNDO and _shape((path[0], current)) is Kind.SNAPSHOT:
            try:
                mtime = _ns((await self.engine.vm_snapshot_info(path[0], current)).creation_time)
            except SnapfsError:
                pass  # a dangling link: the snapshot was deleted
        return Node(path, Kind.CURRENT, LINK_MODE, size=len(current.encode()), mtime_ns=mtime)

    async def _disk_snapshots(self, path: TreePath) -> Node:
        table = await self._disk_table(path[0])
        newest = max((s.date_sec for snaps in table.values() for s in snaps), default=0)
        return self._dir(path, Kind.DISK_SNAPSHOTS, _ns(newest) or self.started_ns, len(table),
                         mode=VERB_DIR_MODE)

    async def _disk_tag(self, path: TreePath) -> Node:
        snaps = await self._disk_tag_snapshots(path)
        newest = max(s.date_sec * 1_000_000_000 + s.date_nsec for s in snaps)
        return self._dir(path, Kind.DISK_TAG, newest)

    async def _snapshot_dir(self, path: TreePath) -> Node:
        return self._snapshot_node(path, await self._vm_snapshot(path))

    def _snapshot_node(self, path: TreePath, snap: VmSnapshot) -> Node:
        return self._dir(path, Kind.SNAPSHOT, _ns(snap.creation_time), subdirs=1)

    async def _snapshot_file(self, path: TreePath, snap: VmSnapshot) -> Node:
        kind = SNAPSHOT_FILES[path[2]]
        if kind is Kind.SAVE:
            return await self._save(path, snap)
        if kind is Kind.DISKS:
            return await self._disks_dir(path, snap)
        if kind is Kind.APPLY:
            return await self._apply(path, snap)
        return await self._generated(path, snap)

    async def _generated(self, path: TreePath, snap: VmSnapshot | None = None) -> Node:
        kind = _shape(path)
        assert kind is not None
        data, mtime = await self._render(path, kind, snap)
        return Node(path, kind, FILE_MODE, size=len(data), mtime_ns=mtime)

    async def _save(self, path: TreePath, snap: VmSnapshot | None = None) -> Node:
        snap = snap or await self._vm_snapshot(path)
        if snap.save is None:
            raise NotFound(f"snapshot {path[1]!r} of {path[0]!r} was taken shut off: no save image")
        try:
            st = await trio.to_thread.run_sync(snap.save.stat)
        except FileNotFoundError:
            raise NotFound(f"the save image of {path[1]!r} is gone") from None
        return Node(path, Kind.SAVE, SECRET_MODE, size=st.st_size,
                    mtime_ns=_ns(snap.creation_time), blocks=st.st_blocks)

    async def _disks_dir(self, path: TreePath, snap: VmSnapshot | None = None) -> Node:
        snap = snap or await self._vm_snapshot(path)
        return self._dir(path, Kind.DISKS, _ns(snap.creation_time))

    async def _disk_view(self, path: TreePath) -> Node:
        """A disk at a snapshot, as a raw image: as big as the disk, as old as the snapshot."""
        _, disk = await self._view_target(path)
        if path[1] == DISK_DIR:
            mtime = disk.date_sec * 1_000_000_000 + disk.date_nsec
        else:
            mtime = _ns((await self._vm_snapshot(path)).creation_time)
        size, taken = (await self._read_disks(path[0])).sizes[disk.dev]
        # The snapshot's own share of the image is not known without reading its
        # tables; what the image takes bounds it, and is what du and tar -S need
        # to see that a mostly empty disk is sparse.
        return Node(path, Kind.DISK_VIEW, SECRET_MODE, size=size, mtime_ns=mtime,
                    blocks=(min(size, taken) + 511) // 512)

    async def _view_target(self, path: TreePath) -> tuple[str, DiskSnapshot]:
        """The tag a view shows (a VM snapshot's or ``.disk/<tag>``) and its disk snapshot."""
        tag = path[2] if path[1] == DISK_DIR else (await self._vm_snapshot(path)).disk_tag
        dev = path[-1].removesuffix(VIEW_SUFFIX)
        for disk in (await self._read_disks(path[0])).tags.get(tag, []):
            if disk.dev == dev:
                return tag, disk
        raise NotFound(f"no disk {dev!r} in snapshot {tag!r} of {path[0]!r}")

    async def _view_names(self, dom: str, tag: str) -> list[str]:
        return [s.dev + VIEW_SUFFIX for s in (await self._read_disks(dom)).tags.get(tag, [])]

    async def _apply(self, path: TreePath, snap: VmSnapshot | None = None) -> Node:
        snap = snap or await self._vm_snapshot(path)
        return Node(path, Kind.APPLY, APPLY_MODE, mtime_ns=_ns(snap.creation_time))

    # -- contents ------------------------------------------------------------

    async def _render(self, path: TreePath, kind: Kind,
                      snap: VmSnapshot | None = None) -> tuple[bytes, int]:
        """A generated file's bytes and mtime."""
        if kind is Kind.DISK_INFO:
            snaps = await self._disk_tag_snapshots(path[:3])
            newest = max(s.date_sec * 1_000_000_000 + s.date_nsec for s in snaps)
            return render_disk_info(snaps).encode(), newest
        snap = snap or await self._vm_snapshot(path)
        mtime = _ns(snap.creation_time)
        if kind is Kind.SNAPSHOT_XL:
            return format_info(snap).encode(), mtime
        if kind is Kind.INFO_JSON:
            # Only the snapshot's own tag is shown: not every tag of the domain each time.
            disk_snaps = (await self._disk_table(path[0])).get(snap.disk_tag, [])
            return render_info_json(snap, disk_snaps).encode(), mtime
        cached = self._configs.get(path[:2])
        if cached is not None and cached[0] == snap:
            return cached[1], mtime
        config = self.engine.snapshot_config_path(path[0], path[1])
        try:
            data = await trio.to_thread.run_sync(config.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"snapshot {path[1]!r} of {path[0]!r} has no saved definition") from None
        if len(self._configs) >= CONFIG_CACHE_MAX:
            self._configs.clear()
        self._configs[path[:2]] = (snap, data)
        return data, mtime

    async def _vm_snapshot(self, path: TreePath) -> VmSnapshot:
        dom, name = path[0], path[1]
        if name != UNDO:
            try:
                check_snapshot_name(name)
            except SnapfsError:
                raise NotFound(f"no VM snapshot named {name!r}") from None
            snap = (await self._snapshot_map(dom)).get(name)
            if snap is not None:
                return snap
        return await self.engine.vm_snapshot_info(dom, name)

    async def _snapshot_map(self, dom: str) -> dict[str, VmSnapshot]:
        """The domain's VM snapshots by name, oldest first.

        The engine's list, kept here while the store dir's mtime is the same: one
        ``ls -l`` or ``find`` then makes a stat per lookup, not a worker-thread
        call. Every change to the store (a snapshot made, removed or renamed, by
        any process) creates, renames or unlinks a file there, which sets the
        dir's mtime. A coarse timestamp could hide a change made in the same
        tick as the last one, so a list is kept at most ``FRESH`` seconds (as the
        engine keeps it) unless that mtime was ``SETTLED`` seconds old before
        the list was asked for: a later change would then bear a later mtime.
        """
        uuid = self.engine.domain(dom).uuid
        store_dir = self._store_dirs.get(uuid)
        if store_dir is None:
            store_dir = self._store_dirs[uuid] = str(Store(self.engine.dirs, uuid).dir)
        now, wall = time.monotonic(), time.time_ns()
        try:
            mtime: int | None = os.stat(store_dir).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        cached = self._snaps.get(dom)
        if cached is not None and cached[0] == mtime and (cached[2] or now - cached[1] < FRESH):
            await trio.lowlevel.checkpoint()
            return cached[3]
        snaps = {s.name: s for s in await self.engine.vm_snapshot_list(dom)}
        if mtime is not None:
            # The engine's own list may be up to FRESH seconds older than this call.
            settled = wall - mtime > _ns(SETTLED)
            self._snaps[dom] = (mtime, now, settled, snaps)
        return snaps

    async def _current_name(self, dom: str) -> str:
        """The snapshot last created or applied.

        Read from the store: ``engine.domain_status`` has it too, but asks QEMU
        for the run state as well, a QMP session per lookup of ``.current``.
        """
        definition = self.engine.domain(dom)
        return await trio.to_thread.run_sync(Store(self.engine.dirs, definition.uuid).current)

    async def _undo(self, dom: str) -> VmSnapshot | None:
        try:
            return await self.engine.vm_snapshot_info(dom, UNDO)
        except NotFound:
            return None

    async def _disk_table(self, dom: str) -> dict[str, list[DiskSnapshot]]:
        """Every disk snapshot tag of the domain's disks, read without the domain lock."""
        return (await self._read_disks(dom)).tags

    async def _read_disks(self, dom: str) -> _Disks:
        """The domain's disks: their snapshots and sizes.

        ``engine.disk_snapshot_list`` would wait for a running operation (and
        talk to QMP); ``qemu-img -U`` does not. Kept for ``FRESH`` seconds so
        one ``ls -l`` does not run qemu-img once per entry, and longer while no
        image file changed (a snapshot made or removed, a write, a resize all
        set its mtime) if their mtimes were ``SETTLED`` when it was read: with
        a thousand snapshots qemu-img takes a tenth of a second.
        """
        now, wall = time.monotonic(), time.time_ns()
        definition = self.engine.domain(dom)
        keys = tuple(_stat_key(disk.file) for disk in definition.disks)
        cached = self._disks.get(dom)
        if cached is not None and (now - cached[0] < FRESH or (cached[2] and cached[1] == keys)):
            await trio.lowlevel.checkpoint()
            return cached[3]
        settled = all(key is not None and wall - key[1] > _ns(SETTLED) for key in keys)
        disks = _Disks({}, {})
        for disk in definition.disks:
            info = await stable_info(disk.file)
            # qemu-nbd (as qemu-img convert -l) exports a snapshot with the disk's
            # size now: a disk resized since is cut, or reads zeros past the end.
            disks.sizes[disk.dev] = (int(info["virtual-size"]), int(info.get("actual-size", 0)))
            for raw in info.get("snapshots", []):
                snap = DiskSnapshot.from_qemu(disk.dev, raw)
                if _disk_tag_ok(snap.tag):
                    disks.tags.setdefault(snap.tag, []).append(snap)
        self._disks[dom] = (now, keys, settled, disks)
        return disks

    async def _disk_tag_snapshots(self, path: TreePath) -> list[DiskSnapshot]:
        snaps = (await self._disk_table(path[0])).get(path[2])
        if not snaps:
            raise NotFound(f"no disk snapshot {path[2]!r} on {path[0]!r}")
        return snaps

    def _changed(self, dom: str, removed: TreePath = ()) -> None:
        """Our own verb changed the domain: forget what was read about it."""
        self._disks.pop(dom, None)
        self._snaps.pop(dom, None)
        if removed:
            for path in [p for p in self._cached if p[:len(removed)] == removed]:
                del self._cached[path]

    # -- open files ----------------------------------------------------------

    async def open(self, path: TreePath, flags: int) -> OpenFile:
        """Open a file; only ``apply`` may be opened for writing."""
        node = await self.get(path)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if node.is_dir:
            raise StateError(f"{'/'.join(path)} is a directory")
        if writing and node.kind is not Kind.APPLY:
            raise self._refused(path, "write", "only apply can be written")
        opened: OpenFile
        if node.kind is Kind.APPLY:
            # Reading apply gives nothing, so a backup of a snapshot directory
            # copies it as an empty file instead of failing.
            opened = OpenFile(node, BytesReader(b""), direct_io=True)
        elif node.kind is Kind.SAVE:
            snap = await self._vm_snapshot(path)
            assert snap.save is not None
            try:
                reader = await FileReader.open(snap.save)
            except FileNotFoundError:
                raise NotFound(f"the save image of {path[1]!r} is gone") from None
            opened = OpenFile(node, reader, keep_cache=self._same_as_cached(
                path, f"{snap.save_sha256}:{node.size}:{node.mtime_ns}"))
        elif node.kind is Kind.DISK_VIEW:
            opened = await self._open_view(node)
        elif node.kind is Kind.STATUS:
            data = render_status(await self.engine.domain_status(path[0])).encode()
            opened = OpenFile(node, BytesReader(data), direct_io=True)
        else:
            data, _ = await self._render(path, node.kind)
            opened = OpenFile(node, BytesReader(data), keep_cache=self._same_as_cached(
                path, hashlib.sha256(data).hexdigest()))
        opened.holder = _holder(path)
        self._open[opened.holder] += 1
        return opened

    async def _open_view(self, node: Node) -> OpenFile:
        path = node.path
        if self.views is None:
            raise StateError(f"{'/'.join(path)}: disk views are served by a mounted tree only")
        self._disks.pop(path[0], None)  # the snapshot as it is now, not as listed 0.5 s ago
        tag, disk = await self._view_target(path)
        vm = path[1] != DISK_DIR
        view = await self.engine.disk_view(self.views, path[0], path[1] if vm else tag,
                                           disk.dev, vm=vm)
        # A snapshot never changes, but a name can be deleted and taken again:
        # the kernel's pages are kept only for the same snapshot of the same disk.
        version = f"{view.image}:{tag}:{disk.id}:{disk.date_sec}.{disk.date_nsec}:{view.size}"
        return OpenFile(node, ViewReader(view), keep_cache=self._same_as_cached(path, version))

    def _same_as_cached(self, path: TreePath, version: str) -> bool:
        """True when the kernel's pages of ``path`` (if any) hold this version."""
        same = self._cached.get(path) == version
        self._cached[path] = version
        return same

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
        """Record an error the tree itself raises as the domain's last_error."""
        self.engine.record_error(dom, str(err))
        return err

    def _refused(self, path: TreePath, action: str, why: str) -> SnapfsError:
        err = ReadOnly(f"{action} {'/'.join(path) or '/'}: read-only ({why})")
        if path and path[0] in self.engine.domain_names():
            self.engine.record_error(path[0], str(err))
        return err

    def _new_name(self, parent: TreePath, name: bytes, what: str) -> str:
        try:
            return check_snapshot_name(name)
        except SnapfsError as err:
            raise self._fail(parent[0], type(err)(f"{what} in {'/'.join(parent)}: {err}")) from None

    async def mkdir(self, parent: TreePath, name: bytes) -> Node:
        """``mkdir <dom>/<name>``: VM snapshot; ``mkdir <dom>/.disk/<tag>``: disk snapshot."""
        kind = _shape(parent)
        if kind is Kind.DOMAIN and parent[0] in self.engine.domain_names():
            snapshot = self._new_name(parent, name, "mkdir")
            try:
                await self.engine.vm_snapshot_create(parent[0], snapshot)
            finally:
                self._changed(parent[0])
            return await self.get((*parent, snapshot))
        if kind is Kind.DISK_SNAPSHOTS and parent[0] in self.engine.domain_names():
            tag = self._new_name(parent, name, "mkdir")
            try:
                await self.engine.disk_snapshot_create(parent[0], tag)
            finally:
                self._changed(parent[0])
            return await self.get((*parent, tag))
        await self.get(parent)
        where = ("domains are defined with `snapfs domain define`" if kind is Kind.ROOT else
                 "snapshots are made in a domain directory or in its .disk directory")
        raise self._refused((*parent, name.decode(errors="replace")), "mkdir", where)

    async def rmdir(self, parent: TreePath, name: bytes) -> None:
        """``rmdir <dom>/<name>``, ``rmdir <dom>/.disk/<tag>``: delete that snapshot."""
        path = (*parent, _decode(name))
        node = await self.get(path)
        if node.kind is Kind.SNAPSHOT and path[1] != UNDO:
            await self._wait_closed(path, f"rmdir {'/'.join(path)}")
            try:
                await self.engine.vm_snapshot_delete(path[0], path[1])
            finally:
                self._changed(path[0], removed=path)
            return
        if node.kind is Kind.DISK_TAG:
            await self._wait_closed(path, f"rmdir {'/'.join(path)}")
            try:
                await self.engine.disk_snapshot_delete(path[0], tag=path[2])
            finally:
                self._changed(path[0], removed=path)
            return
        raise self._refused(path, "rmdir", "only snapshot directories can be removed")

    async def write(self, opened: OpenFile, data: bytes) -> int:
        """A write to ``apply``: ``running`` (or a bare newline) or ``paused``; returns when done."""
        path = opened.node.path
        if opened.node.kind is not Kind.APPLY:
            raise self._refused(path, "write", "only apply can be written")
        word = data.decode("utf-8", errors="replace").strip()
        if word not in ("", "running", "paused"):
            raise self._fail(path[0], StateError(
                f"write to {'/'.join(path)}: {word[:40]!r} is not 'running' or 'paused'"))
        try:
            await self.engine.vm_snapshot_apply(path[0], path[1], paused=word == "paused")
        finally:
            self._changed(path[0])
        return len(data)

    async def refuse(self, path: TreePath, action: str) -> None:
        """Any change without a verb: EROFS, and the reason in ``.status``."""
        raise self._refused(path, action, "the snapshot tree changes only through "
                            "mkdir, rmdir and writes to apply")

    async def truncate(self, path: TreePath) -> Node:
        """Truncation to zero: a no-op on ``apply`` (``echo running > apply`` may ask it)."""
        node = await self.get(path)
        if node.kind is not Kind.APPLY:
            await self.refuse(path, "truncate")
        return node

