"""The facade: the seven snapshot operations, the domain verbs, the tree's queries.

Everything the CLI and the tree do goes through ``Engine``; they only translate
arguments and errors. Each verb runs as one ``operation`` (lock, journal,
progress, error, trace) over one ``Vm``; the protocols themselves live in
``save`` (create), ``apply`` and ``recovery``. Reads go through the
``Catalog``, the one owner of caches, which the verbs here invalidate; a
mounted tree has it follow every change as it happens (``Catalog.watch``).
"""

import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import apply as applying
from . import domains, glance, qemu, trace
from .catalog import Catalog
from .config import DOMAIN_NAME, Dirs, DomainDef, check_snapshot_name, list_domains
from .disks import DiskQueries
from .diskview import DiskViews
from .errors import AlreadyExists, Busy, ConfigError, NotFound, StateError
from .images import DiskSnapshot, DiskTable
from .journal import Journal
from .operation import (
    DeleteStep,
    Discard,
    DiskCreateStep,
    DiskDeleteStep,
    Locks,
    Operation,
    OpName,
    Records,
    run_operation,
)
from .recovery import recover
from .save import SaveMode, create
from .saves import FileReader
from .status import DomainStatus, Progress
from .store import UNDO, UNDO_NEXT, VmSnapshot

__all__ = ["Engine", "DomainStatus", "Progress", "SaveMode"]

logger = logging.getLogger(__name__)

def _now_name() -> str:
    return str(int(time.time()))


class Engine(DiskQueries):
    """The operations over the directories ``dirs``. ``views`` is set by a mounted
    tree for as long as it serves disk views."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self.catalog = Catalog(dirs)
        self.views: DiskViews | None = None
        self.discard: Discard | None = None     # a mounted tree's: unlinks in the background
        self._locks = Locks()
        self._journals: dict[str, Journal] = {}     # for ``recover``'s look only

    # -- bookkeeping ----------------------------------------------------------

    def domain(self, name: str) -> DomainDef:
        """The domain's definition. :raise NotFound: :raise ConfigError: (also kept as
        its last_error: a broken definition is news for `.status`)"""
        try:
            return self.catalog.definition(name)
        except ConfigError as err:
            self.record_error(name, str(err))
            raise

    def record_error(self, domain: str, message: str) -> None:
        Records(self.dirs.of(domain)).record_error(message)

    @asynccontextmanager
    async def _operation(self, name: str, what: OpName) -> AsyncIterator[Operation]:
        definition = self.domain(name)
        try:
            async with run_operation(self.dirs, definition, what, self._locks, recover,
                                     self.discard) as op:
                yield op
        finally:
            self.catalog.changed(name)

    async def recover(self, name: str) -> None:
        """Finish or roll back an operation a dead process left in the journal, if any."""
        if self._journal(name).pending() and self.progress(name) is None:
            async with self._operation(name, OpName.RECOVERY):
                pass

    def _journal(self, name: str) -> Journal:
        # Asked before every answer of the tree: its path is made once.
        if name not in self._journals:
            self._journals[name] = Journal(self.dirs, name)
        return self._journals[name]

    def progress(self, name: str) -> Progress | None:
        """The operation in progress on the domain, by this process or another."""
        return Records(self.dirs.of(name)).read_progress()

    # -- domains --------------------------------------------------------------

    async def domain_define(self, source: Path, replace: bool = False) -> DomainDef:
        return await domains.define(self.dirs, source, replace, self._operation)

    async def domain_undefine(self, name: str, with_snapshots: bool = False) -> int:
        async with self._operation(name, OpName.DOMAIN_UNDEFINE) as op:
            return await domains.undefine(op, with_snapshots)

    def domain_names(self) -> list[str]:
        return list_domains(self.dirs)

    async def domain_start(self, name: str, paused: bool = False) -> None:
        async with self._operation(name, OpName.DOMAIN_START) as op:
            await op.vm.start(paused=paused)

    async def domain_stop(self, name: str, force: bool = False, timeout: float = 60.0) -> bool:
        """Power the domain down (ACPI, then quit after ``timeout``); true if the guest obeyed."""
        async with self._operation(name, OpName.DOMAIN_STOP) as op:
            if not op.vm.running:
                raise StateError(f"domain {name!r} is not running")
            clean = False
            if not force:
                clean = await qemu.powerdown(op.vm.paths, await op.vm.monitor(), timeout)
            await op.vm.quit()
            return clean

    async def domain_status(self, name: str) -> DomainStatus:
        """The domain's run state, current snapshot, operation in progress and last error
        (``glance.domain_status``: what the CLI says without the engine)."""
        definition = self.domain(name)
        await self.recover(name)
        return await trio.to_thread.run_sync(glance.domain_status, self.dirs, definition)

    # -- disk snapshots ---------------------------------------------------------

    async def disk_snapshot_list(self, name: str) -> list[DiskSnapshot]:
        """Every internal snapshot of every disk, in disk order then table order."""
        self.domain(name)
        await self.recover(name)
        return list((await self.catalog.disk_table(name)).listed)

    async def disk_snapshot_create(self, name: str, tag: str | None = None) -> str:
        """One internal snapshot of every disk at one instant, all or none; returns its tag."""
        async with self._operation(name, OpName.DISK_SNAPSHOT_CREATE) as op:
            tag = check_snapshot_name(_now_name() if tag is None else tag)
            await op.vm.require_qcow2()
            await op.vm.check_tag_free(tag)
            op.begin(tag=tag)
            op.step(DiskCreateStep.SNAPSHOT)
            await op.vm.snapshot_disks(tag)
            return tag

    async def disk_snapshot_delete(self, name: str, id: str | None = None,
                                   tag: str | None = None) -> None:
        """Delete a disk snapshot by tag, or by id on each disk that has it."""
        async with self._operation(name, OpName.DISK_SNAPSHOT_DELETE) as op:
            snaps = await op.vm.disk_snapshots()
            if tag is None:
                # Ids are per disk and drift apart; an id is only a way to name one tag.
                tags = {s.tag for s in snaps if s.id == id}
                if len(tags) > 1:
                    raise StateError(f"id {id!r} names different snapshots on different disks "
                                     f"({', '.join(sorted(tags))}): delete by name with -n")
                tag = tags.pop() if tags else None
                what = f"id {id!r}"
            else:
                what = f"name {tag!r}"
            if tag is None or not any(s.tag == tag for s in snaps):
                raise NotFound(f"no disk snapshot with {what} on {name!r}")
            owner = next((s.name for s in (await self.catalog.snapshots(name)).values()
                          if s.disk_tag == tag), "")
            if owner or tag in (await op.vm.stored_tag(UNDO), await op.vm.stored_tag(UNDO_NEXT)):
                raise Busy(f"disk snapshot {tag!r} belongs to VM snapshot {owner or UNDO!r}; "
                           "delete it with vm-snapshot-delete")
            op.vm.refuse_viewed(tag)
            op.begin(tag=tag)
            op.step(DiskDeleteStep.DELETE)
            await op.vm.delete_disk_tag(tag)

    # -- VM snapshots -------------------------------------------------------------

    async def vm_snapshot_create(self, name: str, snapshot: str | None = None,
                                 mode: str = "live") -> VmSnapshot:
        """Definition + memory + disks of one instant; the domain keeps its run state."""
        try:
            save_mode = SaveMode(mode)
        except ValueError:
            raise StateError(f"unknown mode {mode!r}: use live or paused") from None
        async with self._operation(name, OpName.VM_SNAPSHOT_CREATE) as op:
            snapshot = check_snapshot_name(_now_name() if snapshot is None else snapshot)
            store = op.vm.store
            if await trio.to_thread.run_sync(store.exists, snapshot):
                raise AlreadyExists(f"VM snapshot {snapshot!r} of {name!r} already exists")
            await op.vm.require_qcow2()
            await op.vm.check_tag_free(snapshot)
            op.begin(snapshot=snapshot, tag=snapshot, state=(await op.vm.run_state()).value)
            return await create(op, snapshot, snapshot, save_mode, store.current())

    async def vm_snapshot_delete(self, name: str, snapshot: str) -> None:
        async with self._operation(name, OpName.VM_SNAPSHOT_DELETE) as op:
            try:
                snap = await trio.to_thread.run_sync(op.vm.store.read, snapshot)
            except ConfigError as err:  # damaged: whatever is left of it goes
                snap = op.vm.store.damaged(snapshot, str(err))
            op.vm.refuse_viewed(snap.disk_tag)
            op.begin(snapshot=snapshot, tag=snap.disk_tag, parent=snap.parent)
            op.step(DeleteStep.REPARENT)
            with trace.phase("reparent"):
                await trio.to_thread.run_sync(op.vm.store.reparent, snapshot, snap.parent)
            op.step(DeleteStep.FORGET)
            await op.vm.forget(snap.name, snap.disk_tag)

    async def vm_snapshot_apply(self, name: str, snapshot: str, paused: bool = False,
                                undo: bool = True) -> None:
        """Bring the domain back to ``snapshot``; the state it leaves is kept as ``.undo``
        unless ``undo`` is false or the definition says ``keep_undo = false``."""
        async with self._operation(name, OpName.VM_SNAPSHOT_APPLY) as op:
            snap = await trio.to_thread.run_sync(op.vm.store.read, snapshot)
            target = await applying.check(op.vm, snap)
            await applying.refuse_viewed_undo(op.vm)
            await op.vm.require_qcow2()
            await applying.apply(op, target, paused, undo and op.vm.definition.keep_undo)

    async def vm_snapshot_list(self, name: str) -> list[VmSnapshot]:
        """The domain's VM snapshots, oldest first."""
        return list((await self.snapshots(name)).values())

    # -- the tree's queries (snapfs.ops.queries.Queries) ----------------------------

    def domain_exists(self, domain: str) -> bool:
        return DOMAIN_NAME.fullmatch(domain) is not None and self.catalog.defined(domain)

    def domains_mtime_ns(self) -> int:
        try:
            return self.dirs.domains.stat().st_mtime_ns
        except OSError:
            return 0

    def domain_mtime_ns(self, domain: str) -> int:
        if DOMAIN_NAME.fullmatch(domain) is None:
            raise NotFound(f"no domain named {domain!r}")
        try:
            return self.catalog.definition_path(domain).stat().st_mtime_ns
        except OSError:
            raise NotFound(f"no domain named {domain!r}") from None

    async def status(self, domain: str) -> DomainStatus:
        return await self.domain_status(domain)

    def current(self, domain: str) -> str:
        return self.catalog.store(domain).current()

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.dirs.state if self.dirs.state.exists() else "/")

    async def snapshots(self, domain: str) -> Mapping[str, VmSnapshot]:
        await self.recover(domain)
        return await self.catalog.checked_snapshots(domain)

    async def snapshot(self, domain: str, name: str) -> VmSnapshot:
        if name not in (UNDO, UNDO_NEXT):
            snap = (await self.snapshots(domain)).get(name)
            if snap is not None:
                return snap
        return await self.catalog.stored(domain, name)

    async def snapshot_config(self, domain: str, name: str) -> bytes:
        return await self.catalog.config(domain, await self.snapshot(domain, name))

    async def save_size(self, domain: str, name: str) -> tuple[int, int]:
        snap = await self.snapshot(domain, name)
        if snap.save is None:
            raise NotFound(f"snapshot {name!r} of {domain!r} was taken shut off: no save image")
        try:
            return await self.catalog.save_size(domain, snap.save)
        except FileNotFoundError:
            raise NotFound(f"the save image of {name!r} is gone") from None

    async def open_save(self, domain: str, name: str) -> FileReader:
        snap = await self.snapshot(domain, name)
        if snap.save is None:
            raise NotFound(f"snapshot {name!r} of {domain!r} was taken shut off: no save image")
        return await FileReader.open(snap.save)

    async def disk_table(self, domain: str, fresh: bool = False) -> DiskTable:
        return await self.catalog.disk_table(domain, fresh)
