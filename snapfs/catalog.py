"""What the domains have, read through caches: the one place of the cache policy.

``ls -l`` or ``find`` of a domain with a thousand snapshots asks the same few
facts thousands of times: the definition, the snapshot list, the disks'
snapshot tables (``qemu-img info``: 0.1 s on a thousand-snapshot image), a
snapshot's saved definition. Each is kept here with a *key* that changes
whenever what it was read from changes, by this process or another:

    definition       the .toml file's (inode, mtime, size)
    snapshot list    the store dir's mtime (every snapshot made, removed or
                     renamed creates, renames or unlinks a file there)
    disk table       each image file's (inode, mtime, size) (a snapshot made
                     or removed, a write, a resize all set the mtime)
    saved config     the snapshot it belongs to (a name can be taken again)

A coarse timestamp can hide a change made in the same tick as the read, so an
entry is trusted while its key is the same only if that key was SETTLED
seconds old when it was read; otherwise for FRESH seconds at most. The
engine's own verbs drop a domain's entries at once (``changed``).
"""

import os
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

import trio

from . import images
from .config import Dirs, DomainDef, load_domain
from .errors import NotFound
from .images import DiskSnapshot, DiskTable
from .store import DAMAGED, Store, VmSnapshot

__all__ = ["Catalog", "FRESH", "SETTLED"]

FRESH = 0.5
SETTLED = 1.0
CONFIGS_MAX = 10_000   # saved definitions kept (a few KiB each); past this, start again

T = TypeVar("T")
StatKey = tuple[int, int, int] | None


def stat_key(path: Path | str) -> StatKey:
    """What changes when a file is written, replaced or resized; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _settled(mtimes: list[int], wall_ns: int) -> bool:
    return all(wall_ns - m > SETTLED * 1e9 for m in mtimes)


@dataclass
class _Entry(Generic[T]):
    key: Hashable
    read_at: float
    settled: bool
    value: T


class _Cache(Generic[T]):
    """Values by domain, each valid under the policy of the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry[T]] = {}

    def get(self, name: str, key: Hashable) -> T | None:
        entry = self._entries.get(name)
        if entry is None or entry.key != key:
            return None
        if entry.settled or time.monotonic() - entry.read_at < FRESH:
            return entry.value
        return None

    def put(self, name: str, key: Hashable, settled: bool, value: T) -> T:
        self._entries[name] = _Entry(key, time.monotonic(), settled, value)
        return value

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    async def read(self, name: str, key: Hashable, settled: bool,
                   load: Callable[[], Awaitable[T]]) -> T:
        cached = self.get(name, key)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        return self.put(name, key, settled, await load())


class Catalog:
    """The cached facts of the domains under ``dirs``."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self._definitions: dict[str, tuple[StatKey, DomainDef]] = {}
        self._lists: _Cache[dict[str, VmSnapshot]] = _Cache()
        self._tables: _Cache[DiskTable] = _Cache()
        self._configs: dict[tuple[str, str], tuple[VmSnapshot, bytes]] = {}
        self._checked: dict[str, tuple[object, object, dict[str, VmSnapshot]]] = {}

    def changed(self, name: str) -> None:
        """A verb of this process changed the domain: read it again next time."""
        self._lists.drop(name)
        self._tables.drop(name)
        self._checked.pop(name, None)

    def definition_path(self, name: str) -> Path:
        return self.dirs.domains / f"{name}.toml"

    def definition(self, name: str) -> DomainDef:
        """:raise NotFound: when no domain has that name. :raise ConfigError:"""
        key = stat_key(self.definition_path(name))
        cached = self._definitions.get(name)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        definition = load_domain(self.dirs, name)
        if key is not None:
            self._definitions[name] = (key, definition)
        return definition

    def store(self, name: str) -> Store:
        return Store(self.dirs, self.definition(name).uuid)

    async def snapshots(self, name: str) -> dict[str, VmSnapshot]:
        """The domain's VM snapshots by name, oldest first."""
        store = self.store(name)
        wall = time.time_ns()
        try:
            mtime = (await trio.to_thread.run_sync(os.stat, store.dir)).st_mtime_ns
        except FileNotFoundError:
            return {}

        async def load() -> dict[str, VmSnapshot]:
            return {s.name: s for s in await trio.to_thread.run_sync(store.list)}
        return await self._lists.read(name, mtime, _settled([mtime], wall), load)

    async def checked_snapshots(self, name: str) -> dict[str, VmSnapshot]:
        """``snapshots``, where one whose disk snapshot is missing on a disk of the
        domain is marked damaged, with the disks it is missing on."""
        snaps = await self.snapshots(name)
        table = await self.disk_table(name)
        cached = self._checked.get(name)
        if cached is not None and cached[0] is snaps and cached[1] is table:
            return cached[2]
        checked = {n: _check_tags(s, table) for n, s in snaps.items()}
        self._checked[name] = (snaps, table, checked)
        return checked

    async def disk_table(self, name: str, fresh: bool = False) -> DiskTable:
        """Every disk snapshot of the domain's disks by tag, and the disks' sizes, read
        with ``qemu-img -U``: without the domain's lock, so a listing never waits
        behind a long operation."""
        definition = self.definition(name)
        wall = time.time_ns()
        keys = tuple(stat_key(disk.file) for disk in definition.disks)
        if fresh:
            self._tables.drop(name)
        settled = all(k is not None for k in keys) and _settled(
            [k[1] for k in keys if k is not None], wall)
        return await self._tables.read(name, keys, settled, lambda: _read_table(definition))

    async def config(self, name: str, snap: VmSnapshot) -> bytes:
        """The definition saved with ``snap``. :raise NotFound:"""
        cached = self._configs.get((name, snap.name))
        if cached is not None and cached[0] == snap:
            return cached[1]
        path = self.store(name).config_path(snap.name)
        try:
            data = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"snapshot {snap.name!r} of {name!r} has no saved definition") from None
        if len(self._configs) >= CONFIGS_MAX:
            self._configs.clear()
        self._configs[(name, snap.name)] = (snap, data)
        return data


def _check_tags(snap: VmSnapshot, table: DiskTable) -> VmSnapshot:
    if snap.damage:
        return snap
    have = {d.dev for d in table.tags.get(snap.disk_tag, [])}
    # Only the disks the domain has now can be looked at.
    missing = [dev for dev in snap.disks if dev in table.sizes and dev not in have]
    if not missing:
        return snap
    return replace(snap, state=DAMAGED, damage=f"its disk snapshot {snap.disk_tag!r} is "
                   f"missing on {', '.join(missing)}")


def _tag_ok(tag: str) -> bool:
    # qemu-img can make tags that cannot be file names; they stay out of the tree.
    return tag not in ("", ".", "..") and "/" not in tag and "\0" not in tag


async def _read_table(definition: DomainDef) -> DiskTable:
    table = DiskTable({}, {})
    for disk in definition.disks:
        info = await images.stable_info(disk.file)
        # A snapshot is exported with the disk's size now: a disk resized since is
        # cut, or reads zeros past the end.
        table.sizes[disk.dev] = (int(info["virtual-size"]), int(info.get("actual-size", 0)))
        for raw in info.get("snapshots", []):
            snap = DiskSnapshot.from_qemu(disk.dev, raw)
            if _tag_ok(snap.tag):
                table.tags.setdefault(snap.tag, []).append(snap)
    return table
