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

Checking a key costs a stat (of the store dir and each image on a worker
thread) on every call. A mounted tree, one long-lived process, runs ``watch``
(``watch.DomainWatch``: inotify on everything these are read from), and each
change gives the domain a new *generation*. An entry carries the generation
it was read under; while its domain still has that one, the entry is the
truth, given with no stat, no thread hop, no checkpoint. A settled entry
whose key still holds is the truth as of that check: it carries the
generation checked under from then on. Under a watch the store's single
snapshots (``.undo``) and the save images' sizes are kept too, for one
generation; without one they are read each time. A domain the watch cannot
follow has no generation: its keys are checked.
"""

import os
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import trio

from . import images
from .config import Dirs, DomainDef, load_domain
from .errors import NotFound
from .store import Store, VmSnapshot
from .tables import FRESH, SETTLED, DiskTable, TableCopy, check_tags, settled, stat_key, table_of
from .watch import DomainWatch, Sources

__all__ = ["Catalog", "FRESH", "SETTLED"]

CONFIGS_MAX = 10_000   # saved definitions kept (a few KiB each); past this, start again
KEPT_MAX = 10_000      # single snapshots or save sizes kept for one generation

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass
class _Entry(Generic[T]):
    key: Hashable
    read_at: float
    settled: bool
    generation: int | None      # the watch's, of the domain, when it was read or checked
    value: T


class _Cache(Generic[T]):
    """Values by domain, each valid under the policy of the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry[T]] = {}

    def kept(self, name: str, generation: int | None) -> T | None:
        """The value read under ``generation``, the domain's still: no look needed."""
        entry = self._entries.get(name)
        if entry is None or generation is None or entry.generation != generation:
            return None
        return entry.value

    def get(self, name: str, key: Hashable, generation: int | None) -> T | None:
        """The value if its key says it is still good; ``generation`` was taken before
        the key was read."""
        entry = self._entries.get(name)
        if entry is None or entry.key != key:
            return None
        if entry.settled:
            entry.generation = generation
            return entry.value
        if time.monotonic() - entry.read_at < FRESH:
            return entry.value
        return None

    def put(self, name: str, key: Hashable, settled: bool, generation: int | None,
            value: T) -> T:
        self._entries[name] = _Entry(key, time.monotonic(), settled, generation, value)
        return value

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    async def read(self, name: str, key: Hashable, settled: bool, generation: int | None,
                   load: Callable[[], Awaitable[T]]) -> T:
        cached = self.get(name, key, generation)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        return self.put(name, key, settled, generation, await load())


class _Kept(Generic[K, T]):
    """Values by domain and key, kept only under a watch, for one generation."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[int, dict[K, T]]] = {}

    def under(self, name: str, generation: int | None) -> dict[K, T] | None:
        """What is kept of the domain under ``generation``, to read and add to; None:
        nothing may be kept."""
        if generation is None:
            return None
        kept = self._kept.get(name)
        if kept is None or kept[0] != generation or len(kept[1]) >= KEPT_MAX:
            kept = self._kept[name] = (generation, {})
        return kept[1]

    def drop(self, name: str) -> None:
        self._kept.pop(name, None)


class Catalog:
    """The cached facts of the domains under ``dirs``."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self._watch: DomainWatch | None = None
        self._definitions: _Cache[DomainDef] = _Cache()
        self._lists: _Cache[dict[str, VmSnapshot]] = _Cache()
        self._tables: _Cache[DiskTable] = _Cache()
        self._configs: dict[tuple[str, str], tuple[VmSnapshot, bytes]] = {}
        self._checked: dict[str, tuple[object, object, dict[str, VmSnapshot]]] = {}
        self._stored: _Kept[str, VmSnapshot | None] = _Kept()
        self._saves: _Kept[Path, tuple[int, int]] = _Kept()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Follow every domain's changes for as long as this runs (a mounted tree runs it
        in its nursery): entries are trusted by generation (module docstring)."""
        watch = DomainWatch(self._sources)
        self._watch = watch
        try:
            await watch.run(task_status)
        finally:
            self._watch = None

    def _sources(self, name: str) -> Sources:
        definition = load_domain(self.dirs, name)
        return Sources(self.definition_path(name), Store(self.dirs, definition.uuid).dir,
                       tuple(disk.file for disk in definition.disks))

    def _generation(self, name: str) -> int | None:
        return None if self._watch is None else self._watch.generation(name)

    def changed(self, name: str) -> None:
        """A verb of this process changed the domain: read it again next time."""
        self._lists.drop(name)
        self._tables.drop(name)
        self._checked.pop(name, None)
        self._stored.drop(name)
        self._saves.drop(name)

    def definition_path(self, name: str) -> Path:
        return self.dirs.domains / f"{name}.toml"

    def defined(self, name: str) -> bool:
        """Whether ``name`` has a definition file (a stat, unless the watch follows it)."""
        return self._generation(name) is not None or os.path.exists(self.definition_path(name))

    def definition(self, name: str) -> DomainDef:
        """:raise NotFound: when no domain has that name. :raise ConfigError:"""
        generation = self._generation(name)
        kept = self._definitions.kept(name, generation)
        if kept is not None:
            return kept
        wall = time.time_ns()
        key = stat_key(self.definition_path(name))
        cached = self._definitions.get(name, key, generation) if key is not None else None
        if cached is not None:
            return cached
        definition = load_domain(self.dirs, name)
        if key is not None:
            self._definitions.put(name, key, settled([key[1]], wall), generation, definition)
        return definition

    def store(self, name: str) -> Store:
        return Store(self.dirs, self.definition(name).uuid)

    async def snapshots(self, name: str) -> dict[str, VmSnapshot]:
        """The domain's VM snapshots by name, oldest first."""
        generation = self._generation(name)
        kept = self._lists.kept(name, generation)
        if kept is not None:
            return kept
        store = self.store(name)
        wall = time.time_ns()
        try:
            mtime: int | None = (await trio.to_thread.run_sync(os.stat, store.dir)).st_mtime_ns
        except FileNotFoundError:
            mtime = None    # no snapshot yet: its first makes the dir

        async def load() -> dict[str, VmSnapshot]:
            return {s.name: s for s in await trio.to_thread.run_sync(store.list)}
        steady = mtime is None or settled([mtime], wall)
        return await self._lists.read(name, mtime, steady, generation, load)

    async def checked_snapshots(self, name: str) -> dict[str, VmSnapshot]:
        """``snapshots``, where one whose disk snapshot is missing on a disk of the
        domain is marked damaged, with the disks it is missing on."""
        snaps = await self.snapshots(name)
        table = await self.disk_table(name)
        cached = self._checked.get(name)
        if cached is not None and cached[0] is snaps and cached[1] is table:
            return cached[2]
        checked = {n: check_tags(s, table) for n, s in snaps.items()}
        self._checked[name] = (snaps, table, checked)
        return checked

    async def stored(self, name: str, snapshot: str) -> VmSnapshot:
        """One snapshot as its info file says, ``.undo`` included. :raise NotFound:"""
        kept = self._stored.under(name, self._generation(name))
        if kept is not None and snapshot in kept:
            snap = kept[snapshot]
        else:
            store = self.store(name)
            try:
                snap = await trio.to_thread.run_sync(store.read, snapshot)
            except NotFound:
                snap = None
            if kept is not None:
                kept[snapshot] = snap
        if snap is None:
            raise NotFound(f"no VM snapshot named {snapshot!r}")
        return snap

    async def save_size(self, name: str, save: Path) -> tuple[int, int]:
        """A save image's size and 512-byte blocks. :raise FileNotFoundError:"""
        kept = self._saves.under(name, self._generation(name))
        if kept is not None and save in kept:
            return kept[save]
        st = await trio.to_thread.run_sync(save.stat)
        # Only what is in the store is followed by the watch.
        if kept is not None and save.parent == self.store(name).dir:
            kept[save] = st.st_size, st.st_blocks
        return st.st_size, st.st_blocks

    async def disk_table(self, name: str, fresh: bool = False) -> DiskTable:
        """Every disk snapshot of the domain's disks by tag, and the disks' sizes, read
        with ``qemu-img -U``: without the domain's lock, so a listing never waits
        behind a long operation."""
        generation = self._generation(name)
        if fresh:
            self._tables.drop(name)
        kept = self._tables.kept(name, generation)
        if kept is not None:
            return kept
        definition = self.definition(name)
        wall = time.time_ns()
        keys = tuple(stat_key(disk.file) for disk in definition.disks)
        steady = all(k is not None for k in keys) and settled(
            [k[1] for k in keys if k is not None], wall)
        return await self._tables.read(name, keys, steady, generation,
                                       lambda: _read_table(self.dirs, definition))

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


async def _read_table(dirs: Dirs, definition: DomainDef) -> DiskTable:
    """The disks' tables: as another process last read them if the images are still
    as they were then (``tables.TableCopy``), else with ``qemu-img info -U``."""
    copy = TableCopy(dirs.of(definition.name), definition)
    infos = await trio.to_thread.run_sync(copy.load)
    if infos is None:
        wall, keys = time.time_ns(), await trio.to_thread.run_sync(copy.keys)
        infos = [(disk.dev, await images.stable_info(disk.file)) for disk in definition.disks]
        await trio.to_thread.run_sync(copy.save, keys, wall, infos)
    return table_of(infos)
