"""The records the tree's table is made of, and how a path is fitted to a row.

    Node        one name in the tree and what ``stat`` says about it
    NodeKind    one kind of node: how it is stat'ed, listed, opened and changed
    PathTable   rows of (path pattern, NodeKind): the first row that fits a path
                says what it is (``kinds.TABLE`` is the tree's)
    At          a path fitted to its row, with what one request read about it

A pattern is names joined by '/': a fixed name, or ``<x>`` (with an optional
suffix, as in ``<dev>.img``), which fits any name; ``<snap>`` fits a VM
snapshot's name or ``.undo``, never another name starting with '.' (those
belong to snapfs). The kinds themselves and the tree's table are ``kinds``.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from ..config import DOMAIN_NAME, check_snapshot_name
from ..errors import NotFound, SnapfsError
from ..images import DiskSnapshot, DiskTable
from ..store import UNDO, VmSnapshot
from .queries import Queries, Readable

__all__ = ["DIR_MODE", "FRESH", "At", "Node", "NodeKind", "Opening", "PathTable", "TreePath",
           "domain_exists", "ns"]

TreePath = tuple[str, ...]

# How long the kernel may trust a name or an attribute (its entry and attr
# timeouts). The CLI (another process) changes the tree behind the kernel's
# back: its changes must show within a second.
FRESH = 0.5

DIR_MODE = stat.S_IFDIR | 0o555


@dataclass(frozen=True)
class Node:
    """One name in the tree and what ``stat`` says about it."""

    path: TreePath
    kind: NodeKind
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


@dataclass(frozen=True)
class Opening:
    """What a kind's ``open`` gives: the bytes, and how the kernel may cache them."""

    reader: Readable
    direct_io: bool = False     # content may change between reads: bypass the page cache
    version: str | None = None  # names the bytes: the same as at the last open, the kernel
                                # may keep its pages; None: never keep them


@dataclass(frozen=True)
class NodeKind:
    """One row's kind: how to stat it and, as it is a directory, file or link, the rest."""

    name: str
    about: str
    stat: Callable[[At], Awaitable[Node]]
    children: Callable[[At], Awaitable[list[Node]]] | None = None  # entries beyond the fixed
    open: Callable[[At, Node], Awaitable[Opening]] | None = None
    target: Callable[[At], str] | None = None                      # a symlink's
    # The verbs: mkdir of a name in it, rmdir of it, a write to it.
    create: Callable[[At, str], Awaitable[object]] | None = None
    delete: Callable[[At], Awaitable[None]] | None = None
    write: Callable[[At, bytes], Awaitable[None]] | None = None


def ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _tag_fits(tag: str) -> bool:
    # qemu-img can make tags that cannot be file names; they stay out of the tree.
    return tag not in ("", ".", "..") and "/" not in tag and "\0" not in tag


# The last table filtered and its tags that fit: a request asks for the tags
# several times and a table can hold thousands; the engine hands out the same
# table object for as long as its images are unchanged.
_fitted: tuple[DiskTable, dict[str, list[DiskSnapshot]]] | None = None


def _fitting_tags(table: DiskTable) -> dict[str, list[DiskSnapshot]]:
    global _fitted
    if _fitted is None or _fitted[0] is not table:
        _fitted = (table, {tag: snaps for tag, snaps in table.tags.items() if _tag_fits(tag)})
    return _fitted[1]


class At:
    """A path fitted to its row, and what was read about it while answering one request."""

    def __init__(self, paths: PathTable, queries: Queries, path: TreePath, kind: NodeKind,
                 names: dict[str, str], started_ns: int, *, snap: VmSnapshot | None = None,
                 disks: DiskTable | None = None) -> None:
        self.paths = paths
        self.queries = queries
        self.path = path
        self.kind = kind
        self.names = names          # what each <x> of the row matched
        self.started_ns = started_ns
        self._snap = snap
        self._disks = disks

    @property
    def domain(self) -> str:
        return self.path[0]

    def node(self, mode: int, *, size: int = 0, mtime_ns: int = 0, nlink: int = 1,
             blocks: int = -1, timeout: float = FRESH) -> Node:
        return Node(self.path, self.kind, mode, size, mtime_ns, nlink, blocks, timeout)

    def dir(self, mtime_ns: int, subdirs: int = 0, mode: int = DIR_MODE) -> Node:
        return self.node(mode, mtime_ns=mtime_ns, nlink=2 + subdirs)

    def fail(self, err: SnapfsError) -> SnapfsError:
        """Record an error the tree itself raises as the domain's last_error."""
        self.queries.record_error(self.domain, str(err))
        return err

    async def snapshot(self) -> VmSnapshot:
        """The VM snapshot this path is in."""
        if self._snap is None:
            name = self.path[1]
            if name != UNDO:
                try:
                    check_snapshot_name(name)
                except SnapfsError:
                    raise NotFound(f"no VM snapshot named {name!r}") from None
            self._snap = await self.queries.snapshot(self.domain, name)
        return self._snap

    async def disk_table(self, fresh: bool = False) -> DiskTable:
        if self._disks is None or fresh:
            self._disks = await self.queries.disk_table(self.domain, fresh=fresh)
        return self._disks

    async def tags(self) -> dict[str, list[DiskSnapshot]]:
        """The domain's disk snapshots by tag, those whose tag can be a file name."""
        return _fitting_tags(await self.disk_table())

    async def disk_only_tags(self) -> dict[str, list[DiskSnapshot]]:
        """``tags`` but those of VM snapshots (``.undo`` too): those show only in
        their VM snapshot's ``disks``, so a backup of the domain reads each once."""
        tags = await self.tags()
        owned = {snap.disk_tag for snap in (await self.queries.snapshots(self.domain)).values()}
        try:
            owned.add((await self.queries.snapshot(self.domain, UNDO)).disk_tag)
        except NotFound:
            pass
        return {tag: snaps for tag, snaps in tags.items() if tag not in owned}

    async def tag(self) -> str:
        """The tag this path shows: ``.disk/<tag>``'s, or its VM snapshot's."""
        return self.names["tag"] if "tag" in self.names else (await self.snapshot()).disk_tag

    async def tag_snapshots(self) -> list[DiskSnapshot]:
        tag = await self.tag()
        snaps = (await (self.disk_only_tags() if "tag" in self.names else self.tags())).get(tag)
        if not snaps:
            raise NotFound(f"no disk snapshot {tag!r} on {self.domain!r}")
        return snaps

    async def view_disk(self) -> DiskSnapshot:
        """The disk snapshot a disk view shows."""
        tag, dev = await self.tag(), self.names["dev"]
        for disk in await self.tag_snapshots():
            if disk.dev == dev:
                return disk
        raise NotFound(f"no disk {dev!r} in snapshot {tag!r} of {self.domain!r}")

    def child(self, name: str, snap: VmSnapshot | None = None) -> At | None:
        """``name`` in this directory, sharing what was read; None if it fits no row."""
        path = (*self.path, name)
        fitted = self.paths.fit(path)
        if fitted is None:
            return None
        if snap is None and len(self.path) >= 2:
            snap = self._snap       # the same snapshot directory
        return At(self.paths, self.queries, path, *fitted, self.started_ns, snap=snap,
                  disks=self._disks)

    async def nodes(self, names: Iterable[str]) -> list[Node]:
        """The nodes of those of ``names`` in this directory that are there."""
        nodes = []
        for name in names:
            child = self.child(name)
            if child is None:
                continue
            try:
                nodes.append(await child.kind.stat(child))
            except NotFound:
                continue    # .current or .undo absent, or deleted since the listing
        return nodes

    async def entries(self) -> list[Node]:
        """A directory's entries: its fixed names, then its kind's ``children``."""
        nodes = await self.nodes(self.paths.fixed_names(self.path))
        if self.kind.children is not None:
            nodes += await self.kind.children(self)
        return nodes


_FITS: dict[str, Callable[[str], bool]] = {
    "snap": lambda name: not name.startswith(".") or name == UNDO,
}


def _any_name(name: str) -> bool:
    return True


class _Row:
    """One row of a ``PathTable``: its pattern as one matcher per name."""

    def __init__(self, pattern: str, kind: NodeKind) -> None:
        self.pattern = pattern
        self.kind = kind
        self.depth = 0
        self.last: str | None = None    # the last name, if fixed
        # The fixed names by position, then each <x>: position, x, suffix, what fits.
        self._fixed: list[tuple[int, str]] = []
        self._wild: list[tuple[int, str, str, Callable[[str], bool]]] = []
        for part in filter(None, pattern.split("/")):
            wild = re.fullmatch(r"<(\w+)>(.*)", part)
            if wild:
                self._wild.append((self.depth, wild[1], wild[2], _FITS.get(wild[1], _any_name)))
            else:
                self._fixed.append((self.depth, part))
            self.last = None if wild else part
            self.depth += 1

    def fit(self, path: TreePath) -> dict[str, str] | None:
        """What each <x> matches in ``path``, or None: it does not fit.

        Only the names both have are looked at: ``path`` may be a shorter one,
        this row's parent, or a longer one, whose parent this row would be.
        """
        length = len(path)
        for position, fixed in self._fixed:
            if position < length and path[position] != fixed:
                return None
        names = {}
        for position, field, suffix, fits in self._wild:
            if position >= length:
                break
            name = path[position]
            if suffix:
                if not name.endswith(suffix):
                    return None
                name = name[:-len(suffix)]
            if not name or not fits(name):
                return None
            names[field] = name
        return names


class PathTable:
    """Rows of (pattern, kind), tried in order."""

    def __init__(self, rows: Sequence[tuple[str, NodeKind]]) -> None:
        self.rows = [_Row(pattern, kind) for pattern, kind in rows]
        # Only the rows a path could fit are tried, in the table's order: at its
        # depth, those whose last name is the path's, and those ending in <x>.
        self._wild_last: dict[int, list[_Row]] = {}
        self._by_last: dict[tuple[int, str], list[_Row]] = {}
        self._fixed_last: dict[int, list[tuple[_Row, str]]] = {}
        for row in self.rows:
            if row.last is None:
                self._wild_last.setdefault(row.depth, []).append(row)
            else:
                self._fixed_last.setdefault(row.depth, []).append((row, row.last))
                self._by_last[row.depth, row.last] = [
                    other for other in self.rows
                    if other.depth == row.depth and other.last in (None, row.last)]

    def fit(self, path: TreePath) -> tuple[NodeKind, dict[str, str]] | None:
        """What ``path`` would be, from its names alone, and the names its <x> match."""
        depth = len(path)
        candidates = self._by_last.get((depth, path[-1] if path else ""))
        if candidates is None:
            candidates = self._wild_last.get(depth, [])
        for row in candidates:
            names = row.fit(path)
            if names is not None:
                return row.kind, names
        return None

    def fixed_names(self, path: TreePath) -> list[str]:
        """The rows' fixed names one below ``path``, in the table's order."""
        return [last for row, last in self._fixed_last.get(len(path) + 1, [])
                if row.fit(path) is not None]

    def resolve(self, queries: Queries, path: TreePath, started_ns: int) -> At:
        """``path`` fitted to its row.

        :raise NotFound: when it can be nothing, or its domain is not defined.
        """
        fitted = self.fit(path)
        if fitted is None or (path and not domain_exists(queries, path[0])):
            raise NotFound(f"no entry {'/'.join(path)!r} in the tree")
        return At(self, queries, path, *fitted, started_ns)

    def holder(self, path: TreePath) -> TreePath:
        """The directory whose rmdir an open file at ``path`` holds up; () for none."""
        for depth in range(len(path) - 1, 0, -1):
            fitted = self.fit(path[:depth])
            if fitted is not None and fitted[0].delete is not None:
                return path[:depth]
        return ()

    def describe(self) -> str:
        """The rows as a docstring shows them, one line each."""
        width = max(len(row.pattern) for row in self.rows) + 1
        return "".join(f"    {row.pattern:<{width}}{row.kind.name:<15}{row.kind.about}\n"
                       for row in self.rows)


def domain_exists(queries: Queries, name: str) -> bool:
    return DOMAIN_NAME.fullmatch(name) is not None and queries.domain_exists(name)
