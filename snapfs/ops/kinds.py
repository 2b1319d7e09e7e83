"""Every kind of node in the tree: the paths it has, and how it is stat'ed, listed and opened.

A node is named by its path, a tuple of names below the mount point.
``TABLE`` holds every path the tree can have, one row per kind, tried in
order: the first row that fits a path says what it is. ``<x>`` fits any
name; ``<snap>`` fits a VM snapshot's name or ``.undo``, never another name
starting with '.' (those belong to snapfs)::

    /                                 domains        one directory per defined domain
    /<dom>                            domain         one directory per VM snapshot, mkdir makes one
    /<dom>/.status                    status         state, current, operation, last error; uncached
    /<dom>/.current                   current        symlink to the snapshot last created or applied
    /<dom>/.disk                      disk snapshots one directory per disk-only snapshot
    /<dom>/.disk/<tag>                disk snapshot  rmdir deletes it
    /<dom>/.disk/<tag>/info           disk info      id, tag, vm size, date, vm clock of each disk
    /<dom>/.disk/<tag>/<dev>.img      disk view      the disk at that snapshot, raw (0400)
    /<dom>/.undo                      undo           the state the last apply replaced (no rmdir)
    /<dom>/<snap>                     snapshot       rmdir deletes it
    /<dom>/<snap>/snapshotdata.xl     info file      key="value" lines, as the store keeps them
    /<dom>/<snap>/info.json           info.json      the same facts as JSON, plus the disk snapshots
    /<dom>/<snap>/config.toml         config         the domain definition at snapshot time
    /<dom>/<snap>/save                save image     the stored file's bytes (0400)
    /<dom>/<snap>/disks               disk views     one view per disk, and its changes
    /<dom>/<snap>/disks/<dev>.img     disk view      the disk at snapshot time, raw (0400)
    /<dom>/<snap>/disks/<dev>.changes changes        byte ranges that differ from the parent
    /<dom>/<snap>/apply               apply          write-only (0200): writing reverts the domain

A directory's entries are the rows one name below it whose last name is
fixed, in the table's order, then what its kind's ``children`` asks of the
engine (domains, snapshots, tags, disks). Whether a path that fits a row
exists is asked of the engine each time, so another process's changes show
at once; the engine keeps the caches, the tree none. An ``At`` is a path
fitted to its row with what one request read about it, so the entries of a
snapshot directory are all made from the one snapshot read.
"""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Awaitable, Callable

from ..errors import NotFound, NotSupported, SnapfsError, StateError
from ..images import DiskSnapshot
from ..store import UNDO, VmSnapshot, format_info
from .nodes import At, Node, NodeKind, Opening, PathTable, ns
from .render import BytesReader, render_changes, render_disk_info, render_info_json, render_status

__all__ = ["TABLE"]

VIEW_SUFFIX = ".img"
CHANGES_SUFFIX = ".changes"
VERB_DIR_MODE = stat.S_IFDIR | 0o755       # mkdir/rmdir are verbs here
FILE_MODE = stat.S_IFREG | 0o444
SECRET_MODE = stat.S_IFREG | 0o400         # guest memory, guest disks
APPLY_MODE = stat.S_IFREG | 0o200
LINK_MODE = stat.S_IFLNK | 0o777


def _date_ns(snap: DiskSnapshot) -> int:
    return snap.date_sec * 1_000_000_000 + snap.date_nsec


# -- each kind: how it is stat'ed, listed, opened, changed ---------------------------

async def _stat_root(at: At) -> Node:
    domains = at.queries.domain_names()
    return at.dir(at.queries.domains_mtime_ns() or at.started_ns, len(domains))


async def _domain_dirs(at: At) -> list[Node]:
    return await at.nodes(at.queries.domain_names())


async def _undo(at: At) -> VmSnapshot | None:
    try:
        return await at.queries.snapshot(at.domain, UNDO)
    except NotFound:
        return None


async def _stat_domain(at: At) -> Node:
    snaps = (await at.queries.snapshots(at.domain)).values()
    undo = await _undo(at)
    try:
        defined = at.queries.domain_mtime_ns(at.domain)
    except NotFound:
        raise NotFound(f"no domain named {at.domain!r}") from None
    newest = max([ns(s.creation_time) for s in snaps] + [defined])
    # Subdirectories: the snapshots, .disk, and .undo when there is one.
    return at.dir(newest, len(snaps) + 1 + (undo is not None), mode=VERB_DIR_MODE)


async def _snapshot_dirs(at: At) -> list[Node]:
    nodes = []
    for snap in (await at.queries.snapshots(at.domain)).values():
        child = at.child(snap.name, snap)
        if child is not None:
            nodes.append(await child.kind.stat(child))
    return nodes


async def _create_vm_snapshot(at: At, name: str) -> None:
    await at.queries.vm_snapshot_create(at.domain, name)


async def _status_bytes(at: At) -> bytes:
    return render_status(await at.queries.status(at.domain)).encode()


async def _stat_status(at: At) -> Node:
    data = await _status_bytes(at)
    return at.node(FILE_MODE, size=len(data), mtime_ns=time.time_ns(), timeout=0)


async def _open_status(at: At, node: Node) -> Opening:
    return Opening(BytesReader(await _status_bytes(at)), direct_io=True)


def _current_target(at: At) -> str:
    return at.queries.current(at.domain)


async def _stat_current(at: At) -> Node:
    current = _current_target(at)
    if not current:
        raise NotFound(f"domain {at.domain!r} has no current snapshot")
    mtime = at.started_ns
    if not current.startswith("."):
        try:
            mtime = ns((await at.queries.snapshot(at.domain, current)).creation_time)
        except SnapfsError:
            pass    # a dangling link: the snapshot was deleted
    return at.node(LINK_MODE, size=len(current.encode()), mtime_ns=mtime)


async def _stat_disk_snapshots(at: At) -> Node:
    tags = await at.disk_only_tags()
    newest = max((s.date_sec for snaps in tags.values() for s in snaps), default=0)
    return at.dir(ns(newest) or at.started_ns, len(tags), mode=VERB_DIR_MODE)


async def _tag_dirs(at: At) -> list[Node]:
    return await at.nodes(sorted(await at.disk_only_tags()))


async def _create_disk_snapshot(at: At, tag: str) -> None:
    await at.queries.disk_snapshot_create(at.domain, tag)


async def _stat_disk_tag(at: At) -> Node:
    return at.dir(max(_date_ns(s) for s in await at.tag_snapshots()))


async def _delete_disk_snapshot(at: At) -> None:
    await at.queries.disk_snapshot_delete(at.domain, tag=at.names["tag"])


async def _views(at: At) -> list[Node]:
    disks = (await at.tags()).get(await at.tag(), [])
    return await at.nodes(disk.dev + VIEW_SUFFIX for disk in disks)


async def _views_and_changes(at: At) -> list[Node]:
    disks = (await at.tags()).get(await at.tag(), [])
    return await at.nodes(disk.dev + suffix for disk in disks
                          for suffix in (VIEW_SUFFIX, CHANGES_SUFFIX))


async def _view_node(at: At, disk: DiskSnapshot, mtime_ns: int) -> Node:
    """A disk at a snapshot, as a raw image: as big as the disk was, as old as the
    snapshot, taking the blocks of the clusters the snapshot references (what du sums)."""
    usage = await at.queries.disk_usage(at.domain, await at.tag(), disk.dev)
    if usage is not None:
        size, blocks = usage
    else:
        # Served by qemu-nbd, with the disk's size now; what the whole image
        # takes bounds the snapshot's share.
        size, taken = (await at.disk_table()).sizes[disk.dev]
        blocks = (min(size, taken) + 511) // 512
    return at.node(SECRET_MODE, size=size, mtime_ns=mtime_ns, blocks=blocks)


async def _stat_tag_view(at: At) -> Node:
    disk = await at.view_disk()
    return await _view_node(at, disk, _date_ns(disk))


async def _stat_snapshot_view(at: At) -> Node:
    disk = await at.view_disk()
    return await _view_node(at, disk, ns((await at.snapshot()).creation_time))


async def _open_view(at: At, node: Node) -> Opening:
    # The snapshot as it is now, not as listed a moment ago.
    table = await at.disk_table(fresh=True)
    tag, disk = await at.tag(), await at.view_disk()
    reader = await at.queries.open_disk_view(at.domain, tag, disk.dev)
    # A snapshot never changes, but a name can be deleted and taken again, and
    # a domain redefined with other images: the kernel's pages are kept only
    # for the same snapshot of the same disk.
    version = (f"{at.queries.domain_mtime_ns(at.domain)}:{tag}:{disk.id}:"
               f"{disk.date_sec}.{disk.date_nsec}:{table.sizes[disk.dev][0]}")
    return Opening(reader, version=version)


async def _render_changes(at: At) -> tuple[bytes, int]:
    snap, disk = await at.snapshot(), await at.view_disk()
    parent = None
    if snap.parent:
        try:
            parent = (await at.queries.snapshot(at.domain, snap.parent)).disk_tag
        except NotFound:
            parent = None
    try:
        compared, ranges = await at.queries.disk_changes(at.domain, disk.tag, disk.dev, parent)
    except NotSupported:
        raise NotFound(f"no changes of {disk.dev!r}: its image is served by qemu-nbd") from None
    data = render_changes(snap.parent if compared is not None else None, ranges)
    return data.encode(), ns(snap.creation_time)


async def _stat_snapshot(at: At) -> Node:
    return at.dir(ns((await at.snapshot()).creation_time), subdirs=1)


async def _delete_vm_snapshot(at: At) -> None:
    await at.queries.vm_snapshot_delete(at.domain, at.path[1])


async def _stat_save(at: At) -> Node:
    snap = await at.snapshot()
    if snap.save is None:
        raise NotFound(f"snapshot {at.path[1]!r} of {at.domain!r} was taken shut off: "
                       "no save image")
    size, blocks = await at.queries.save_size(at.domain, at.path[1])
    return at.node(SECRET_MODE, size=size, mtime_ns=ns(snap.creation_time), blocks=blocks)


async def _open_save(at: At, node: Node) -> Opening:
    snap = await at.snapshot()
    reader = await at.queries.open_save(at.domain, at.path[1])
    return Opening(reader, version=f"{snap.save_sha256}:{node.size}:{node.mtime_ns}")


async def _stat_disks(at: At) -> Node:
    return at.dir(ns((await at.snapshot()).creation_time))


async def _stat_apply(at: At) -> Node:
    return at.node(APPLY_MODE, mtime_ns=ns((await at.snapshot()).creation_time))


async def _open_apply(at: At, node: Node) -> Opening:
    # Reading apply gives nothing, so a backup of a snapshot directory copies
    # it as an empty file instead of failing.
    return Opening(BytesReader(b""), direct_io=True)


async def _write_apply(at: At, data: bytes) -> None:
    """``running`` (or a bare newline) or ``paused``; returns when the apply is done."""
    word = data.decode("utf-8", errors="replace").strip()
    if word not in ("", "running", "paused"):
        raise at.fail(StateError(f"write to {'/'.join(at.path)}: {word[:40]!r} is not "
                                 "'running' or 'paused'"))
    await at.queries.vm_snapshot_apply(at.domain, at.path[1], paused=word == "paused")


Render = Callable[[At], Awaitable[tuple[bytes, int]]]


def _generated(name: str, about: str, render: Render, mode: int = FILE_MODE) -> NodeKind:
    """A file whose bytes ``render`` makes (with its mtime); their hash is its version."""
    async def stat(at: At) -> Node:
        data, mtime = await render(at)
        return at.node(mode, size=len(data), mtime_ns=mtime)

    async def open_(at: At, node: Node) -> Opening:
        data, _ = await render(at)
        return Opening(BytesReader(data), version=hashlib.sha256(data).hexdigest())

    return NodeKind(name, about, stat, open=open_)


async def _render_disk_info(at: At) -> tuple[bytes, int]:
    snaps = await at.tag_snapshots()
    return render_disk_info(snaps).encode(), max(_date_ns(s) for s in snaps)


async def _render_xl(at: At) -> tuple[bytes, int]:
    snap = await at.snapshot()
    return format_info(snap).encode(), ns(snap.creation_time)


async def _render_info_json(at: At) -> tuple[bytes, int]:
    snap = await at.snapshot()
    # Only the snapshot's own tag is shown: not every tag of the domain each time.
    disk_snaps = (await at.tags()).get(snap.disk_tag, [])
    return render_info_json(snap, disk_snaps).encode(), ns(snap.creation_time)


async def _render_config(at: At) -> tuple[bytes, int]:
    snap = await at.snapshot()
    return await at.queries.snapshot_config(at.domain, at.path[1]), ns(snap.creation_time)


# -- the table ---------------------------------------------------------------------------

TABLE = PathTable((
    ("/", NodeKind("domains", "one directory per defined domain", _stat_root,
                   children=_domain_dirs)),
    ("/<dom>", NodeKind("domain", "one directory per VM snapshot, mkdir makes one",
                        _stat_domain, children=_snapshot_dirs, create=_create_vm_snapshot)),
    ("/<dom>/.status", NodeKind(
        "status", "state, current, operation, last error; uncached", _stat_status,
        open=_open_status)),
    ("/<dom>/.current", NodeKind("current", "symlink to the snapshot last created or applied",
                                 _stat_current, target=_current_target)),
    ("/<dom>/.disk", NodeKind(
        "disk snapshots", "one directory per disk-only snapshot",
        _stat_disk_snapshots, children=_tag_dirs, create=_create_disk_snapshot)),
    ("/<dom>/.disk/<tag>", NodeKind("disk snapshot", "rmdir deletes it", _stat_disk_tag,
                                    children=_views, delete=_delete_disk_snapshot)),
    ("/<dom>/.disk/<tag>/info", _generated(
        "disk info", "id, tag, vm size, date, vm clock of each disk", _render_disk_info)),
    ("/<dom>/.disk/<tag>/<dev>.img", NodeKind(
        "disk view", "the disk at that snapshot, raw (0400)", _stat_tag_view, open=_open_view)),
    ("/<dom>/.undo", NodeKind("undo", "the state the last apply replaced (no rmdir)",
                              _stat_snapshot)),
    ("/<dom>/<snap>", NodeKind("snapshot", "rmdir deletes it", _stat_snapshot,
                               delete=_delete_vm_snapshot)),
    ("/<dom>/<snap>/snapshotdata.xl", _generated(
        "info file", "key=\"value\" lines, as the store keeps them", _render_xl)),
    ("/<dom>/<snap>/info.json", _generated(
        "info.json", "the same facts as JSON, plus the disk snapshots", _render_info_json)),
    ("/<dom>/<snap>/config.toml", _generated(
        "config", "the domain definition at snapshot time", _render_config)),
    ("/<dom>/<snap>/save", NodeKind("save image", "the stored file's bytes (0400)", _stat_save,
                                    open=_open_save)),
    ("/<dom>/<snap>/disks", NodeKind("disk views", "one view per disk, and its changes",
                                     _stat_disks, children=_views_and_changes)),
    ("/<dom>/<snap>/disks/<dev>.img", NodeKind(
        "disk view", "the disk at snapshot time, raw (0400)", _stat_snapshot_view,
        open=_open_view)),
    # Where a guest wrote is its disk's secret too: root-only, as the view.
    ("/<dom>/<snap>/disks/<dev>.changes", _generated(
        "changes", "byte ranges that differ from the parent", _render_changes, SECRET_MODE)),
    ("/<dom>/<snap>/apply", NodeKind(
        "apply", "write-only (0200): writing reverts the domain", _stat_apply,
        open=_open_apply, write=_write_apply)),
))
