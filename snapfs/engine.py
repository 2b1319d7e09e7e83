"""The snapshot engine: the RFC's seven operations and the domain verbs.

Everything the CLI and the tree do goes through ``Engine``; they only translate
arguments and errors. Operations on one domain are serialized across processes
by an flock on ``<run dir>/<name>.lock``; different domains run side by side.
While an operation runs, ``<run dir>/<name>.op`` says what it is and how far it
got; a failure's message is kept in ``<run dir>/<name>.error`` for ``.status``.
"""

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from . import domain as qemu
from . import images, qmp
from .config import Dirs, DomainDef, check_domain_name, check_snapshot_name, define_domain, \
    list_domains, load_domain, parse_domain
from .errors import AlreadyExists, Busy, ConfigError, NoSpace, NotFound, NotSupported, \
    QemuError, SnapfsError, StateError
from .files import atomic_write
from .images import DiskSnapshot
from .diskview import DiskView, DiskViewError, DiskViews, exported
from .journal import Entry, Journal
from .store import UNDO, UNDO_NEXT, GrowingHash, Store, VmSnapshot, sha256_file

__all__ = ["Engine", "DomainStatus", "Progress"]

logger = logging.getLogger(__name__)

SAVE_FD = "snapfs-save"
RESTORE_FD = "snapfs-restore"
# Migration defaults throttle a save to 128 MiB/s and send a paused VM's RAM in
# one step under QEMU's global lock (DESIGN §7): lift the cap, keep steps short.
MIGRATE_PARAMETERS = {"max-bandwidth": 1 << 40, "downtime-limit": 5}
POLL = 0.01
LIST_MAX_AGE = 0.5
MODES = ("live", "paused")


@dataclass(frozen=True)
class Progress:
    operation: str
    phase: str = ""             # what the operation is doing now, e.g. "saving memory"
    done: int = 0               # bytes
    total: int = 0
    pid: int = 0
    started: float = 0.0


@dataclass(frozen=True)
class DomainStatus:
    name: str
    state: str                  # running | paused | shutoff
    current: str
    operation: Progress | None
    last_error: str


_VIEW_ERRORS: dict[int, type[SnapfsError]] = {
    errno.ENOENT: NotFound, errno.EOPNOTSUPP: NotSupported, errno.EINVAL: StateError,
}


@dataclass(frozen=True)
class _Saved:
    state: str
    size: int
    sha256: str
    pause_ms: float
    mode: str


def _now_name() -> str:
    return str(int(time.time()))


class Engine:
    """The operations of DESIGN §3 over the directories ``dirs``."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self._local_locks: dict[str, trio.Lock] = {}
        self._running: dict[str, Progress] = {}
        self._definitions: dict[str, tuple[tuple[int, int, int], DomainDef]] = {}
        # Snapshot lists by domain: (store dir mtime, when read, snapshots by name).
        self._lists: dict[str, tuple[int, float, dict[str, VmSnapshot]]] = {}

    # -- bookkeeping -------------------------------------------------------

    def _store(self, dom: DomainDef) -> Store:
        return Store(self.dirs, dom.uuid)

    def _op_path(self, name: str) -> Path:
        return self.dirs.run / f"{name}.op"

    def _error_path(self, name: str) -> Path:
        return self.dirs.run / f"{name}.error"

    def record_error(self, name: str, message: str) -> None:
        """Keep ``message`` as the domain's ``last_error`` (the tree shows it in ``.status``)."""
        try:
            self.dirs.run.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self._error_path(name), f"{int(time.time())} {message}\n", mode=0o644)
        except OSError as err:
            logger.warning("cannot record last error of %s: %s", name, err)

    def _report(self, name: str, phase: str, done: int = 0, total: int = 0) -> None:
        """Publish how far the domain's operation got (``.status``, the CLI's progress bar)."""
        progress = self._running.get(name)
        if progress is not None:
            self._progress(name, replace(progress, phase=phase, done=done, total=total))

    def _progress(self, name: str, progress: Progress) -> None:
        self._running[name] = progress
        try:
            atomic_write(self._op_path(name), json.dumps(progress.__dict__), mode=0o644)
        except OSError as err:
            logger.debug("cannot record progress of %s: %s", name, err)

    @asynccontextmanager
    async def _operation(self, name: str, operation: str) -> AsyncIterator[Journal]:
        """Hold the domain's lock for ``operation``; record its failure as last_error.

        A journal left by a process that died mid-operation is recovered first.
        """
        self.dirs.ensure()
        local = self._local_locks.setdefault(name, trio.Lock())
        try:
            async with local:
                fd = os.open(qemu.Paths(self.dirs, name).lock,
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            await trio.sleep(0.02)
                    journal = Journal(self.dirs, name)
                    entry = journal.read()
                    if entry is not None:
                        await self._recover(name, entry)
                        journal.end()
                    self._progress(name, Progress(operation, pid=os.getpid(), started=time.time()))
                    try:
                        yield journal
                    finally:
                        journal.end()
                        self._running.pop(name, None)
                        self._lists.pop(name, None)
                        self._op_path(name).unlink(missing_ok=True)
                finally:
                    os.close(fd)
        except SnapfsError as err:
            self.record_error(name, f"{operation}: {err}")
            raise

    async def recover(self, name: str) -> None:
        """Finish or roll back an operation a dead process left in the journal, if any."""
        if Journal(self.dirs, name).pending() and self._read_progress(name) is None:
            async with self._operation(name, "recovery"):
                pass

    def _domain(self, name: str) -> DomainDef:
        """The domain's definition, parsed again only when its file changed."""
        try:
            st = os.stat(self.dirs.domains / f"{check_domain_name(name)}.toml")
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        cached = self._definitions.get(name)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        try:
            dom = load_domain(self.dirs, name)
        except SnapfsError as err:
            if isinstance(err, ConfigError):
                self.record_error(name, str(err))
            raise
        if key is not None:
            self._definitions[name] = (key, dom)
        return dom

    def domain(self, name: str) -> DomainDef:
        """The domain's definition (cached by its file's stat, as every operation reads it)."""
        return self._domain(name)

    async def _formats(self, dom: DomainDef) -> dict[str, str]:
        infos = [await images.image_info(d.file) for d in dom.disks]
        return {d.dev: info["format"] for d, info in zip(dom.disks, infos, strict=True)}

    async def _require_qcow2(self, dom: DomainDef) -> None:
        for dev, fmt in (await self._formats(dom)).items():
            if fmt != "qcow2":
                raise NotSupported(f"disk {dev} of {dom.name!r} is {fmt}, not qcow2: "
                                   "it cannot hold internal snapshots")

    # -- domains -----------------------------------------------------------

    def domain_define(self, source: Path) -> DomainDef:
        return define_domain(self.dirs, source)

    def domain_names(self) -> list[str]:
        return list_domains(self.dirs)

    async def domain_start(self, name: str, paused: bool = False) -> None:
        dom = self._domain(name)
        async with self._operation(name, "domain-start"):
            await qemu.start(self.dirs, dom, await self._formats(dom), paused=paused)

    async def domain_stop(self, name: str, force: bool = False, timeout: float = 60.0) -> bool:
        """Power the domain down (ACPI, then quit after ``timeout``); true if the guest obeyed."""
        self._domain(name)
        async with self._operation(name, "domain-stop"):
            if qemu.running_pid(self.dirs, name) is None:
                raise StateError(f"domain {name!r} is not running")
            clean = False
            if not force:
                clean = await qemu.powerdown(self.dirs, name, timeout)
            await qemu.quit(self.dirs, name)
            return clean

    def _state_file(self, name: str) -> Path:
        return self.dirs.run / f"{name}.state"

    async def domain_status(self, name: str) -> DomainStatus:
        """The domain's run state, current snapshot, operation in progress and last error.

        Does not wait for a running operation: while one holds the monitor, the
        state is the one that operation last recorded.
        """
        dom = self._domain(name)
        await self.recover(name)
        op = self._read_progress(name)
        state = "shutoff"
        if qemu.running_pid(self.dirs, name) is not None:
            state = await self._live_state(name, busy=op is not None)
        try:
            last_error = self._error_path(name).read_text().strip()
        except OSError:
            last_error = ""
        current = await trio.to_thread.run_sync(self._store(dom).current)
        return DomainStatus(name, state, current, op, last_error)

    async def _live_state(self, name: str, busy: bool) -> str:
        if not busy:
            with trio.move_on_after(2):
                try:
                    async with qmp.connect(qemu.Paths(self.dirs, name).qmp) as mon:
                        state = await qemu.run_state(mon)
                    self._remember_state(name, state)
                    return state
                except QemuError as err:
                    logger.debug("status of %s: %s", name, err)
        try:
            return self._state_file(name).read_text().strip() or "running"
        except OSError:
            return "running"

    def _remember_state(self, name: str, state: str) -> None:
        try:
            atomic_write(self._state_file(name), state, mode=0o644)
        except OSError as err:
            logger.debug("cannot record state of %s: %s", name, err)

    def progress(self, name: str) -> Progress | None:
        """The operation in progress on the domain, by this process or another."""
        return self._running.get(name) or self._read_progress(name)

    def _read_progress(self, name: str) -> Progress | None:
        try:
            raw = json.loads(self._op_path(name).read_text())
            progress = Progress(**raw)
        except (OSError, ValueError, TypeError):
            return None
        # An operation whose process died is not in progress (the journal recovers it).
        try:
            os.kill(progress.pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return progress

    # -- disk snapshots ----------------------------------------------------

    async def disk_snapshot_list(self, name: str) -> list[DiskSnapshot]:
        """Every internal snapshot of every disk, in disk order then id order."""
        dom = self._domain(name)
        async with self._operation(name, "disk-snapshot-list"):
            return await self._disk_snapshots(dom)

    async def _disk_snapshots(self, dom: DomainDef,
                              mon: qmp.Monitor | None = None) -> list[DiskSnapshot]:
        """QMP when the domain runs (through ``mon`` if the caller has it open), else qemu-img."""
        running = qemu.running_pid(self.dirs, dom.name) is not None
        if mon is None and running:
            async with qmp.connect(qemu.Paths(self.dirs, dom.name).qmp) as own:
                return await self._disk_snapshots(dom, own)
        if mon is None:
            result = []
            for disk in dom.disks:
                result += await images.list_snapshots(disk.dev, disk.file)
            return result
        nodes = await mon.execute("query-named-block-nodes", {"flat": True})
        by_node = {n["node-name"]: n for n in nodes}
        result = []
        for disk in dom.disks:
            image = by_node.get(disk.dev, {}).get("image", {})
            result += [DiskSnapshot.from_qemu(disk.dev, s) for s in image.get("snapshots", [])]
        return result

    async def _check_tag_free(self, dom: DomainDef, tag: str) -> None:
        taken = [s.dev for s in await self._disk_snapshots(dom) if s.tag == tag]
        if taken:
            raise AlreadyExists(f"disk snapshot {tag!r} already exists on {', '.join(taken)}")

    async def disk_snapshot_create(self, name: str, tag: str | None = None) -> str:
        """One internal snapshot of every disk at one instant, all or none; returns its tag."""
        dom = self._domain(name)
        async with self._operation(name, "disk-snapshot-create") as journal:
            tag = check_snapshot_name(_now_name() if tag is None else tag)
            await self._require_qcow2(dom)
            await self._check_tag_free(dom, tag)
            journal.begin("disk-snapshot-create", tag=tag)
            journal.step("snapshot")
            if qemu.running_pid(self.dirs, name) is None:
                await self._offline_disk_snapshot(dom, tag)
            else:
                async with qmp.connect(qemu.Paths(self.dirs, name).qmp) as mon:
                    await self._disk_transaction(mon, dom, tag)
            return tag

    async def _offline_disk_snapshot(self, dom: DomainDef, tag: str) -> None:
        done: list[Path] = []
        try:
            for disk in dom.disks:
                await images.snapshot_create(disk.file, tag)
                done.append(disk.file)
        except SnapfsError:
            with trio.CancelScope(shield=True):
                for path in done:
                    await images.snapshot_delete(path, tag)
            raise

    async def _disk_transaction(self, mon: qmp.Monitor, dom: DomainDef, tag: str) -> None:
        actions = [{"type": "blockdev-snapshot-internal-sync",
                    "data": {"device": d.dev, "name": tag}} for d in dom.disks]
        await mon.execute("transaction", {"actions": actions})

    async def _delete_disk_tag(self, dom: DomainDef, tag: str, mon: qmp.Monitor | None,
                               only: set[str] | None = None) -> None:
        for disk in dom.disks:
            if only is not None and disk.dev not in only:
                continue
            if mon is None:
                await images.snapshot_delete(disk.file, tag)
            else:
                await mon.execute("blockdev-snapshot-delete-internal-sync",
                                  {"device": disk.dev, "name": tag})

    async def disk_snapshot_delete(self, name: str, id: str | None = None,
                                   tag: str | None = None) -> None:
        """Delete a disk snapshot by tag, or by id on each disk that has it."""
        dom = self._domain(name)
        async with self._operation(name, "disk-snapshot-delete") as journal:
            snaps = await self._disk_snapshots(dom)
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
            owner = await trio.to_thread.run_sync(self._vm_snapshot_of_tag, self._store(dom), tag)
            if owner:
                raise Busy(f"disk snapshot {tag!r} belongs to VM snapshot {owner!r}; "
                           "delete it with vm-snapshot-delete")
            self._refuse_exported(dom, {tag})
            journal.begin("disk-snapshot-delete", tag=tag)
            journal.step("delete")
            await self._delete_tag_where_present(dom, tag)

    @staticmethod
    def _vm_snapshot_of_tag(store: Store, tag: str) -> str:
        for name in store.names():
            try:
                if store.read(name).disk_tag == tag:
                    return name
            except SnapfsError:
                continue
        return ""

    def _refuse_exported(self, dom: DomainDef, tags: set[str]) -> None:
        for disk in dom.disks:
            for tag in tags:
                if exported(self.dirs.run, disk.file, tag):
                    raise Busy(f"snapshot {tag!r} of disk {disk.dev} is open as a disk view; "
                               "close it first")

    async def _refuse_exported_undo(self, dom: DomainDef, store: Store) -> None:
        """An apply replaces ``.undo`` and so deletes its disk snapshots: not while viewed."""
        if not await trio.to_thread.run_sync(store.exists, UNDO):
            return
        undo = await trio.to_thread.run_sync(store.read, UNDO)
        for disk in dom.disks:
            if exported(self.dirs.run, disk.file, undo.disk_tag):
                raise Busy(f"{UNDO} (what the last apply replaced) is open as a disk view "
                           f"({disk.dev}), and this apply would replace it; close it first")

    @asynccontextmanager
    async def _maybe_monitor(self, dom: DomainDef, running: bool) -> AsyncIterator[qmp.Monitor | None]:
        if not running:
            yield None
            return
        async with qmp.connect(qemu.Paths(self.dirs, dom.name).qmp) as mon:
            yield mon

    # -- VM snapshots ------------------------------------------------------

    async def vm_snapshot_list(self, name: str) -> list[VmSnapshot]:
        """The domain's VM snapshots, oldest first."""
        return list((await self._snapshots(name)).values())

    async def vm_snapshot_info(self, name: str, snapshot: str) -> VmSnapshot:
        """:raise NotFound: when the domain has no such snapshot."""
        if snapshot not in (UNDO, UNDO_NEXT):
            snap = (await self._snapshots(name)).get(snapshot)
            if snap is not None:
                return snap
        dom = self._domain(name)
        return await trio.to_thread.run_sync(self._store(dom).read, snapshot)

    async def _snapshots(self, name: str) -> dict[str, VmSnapshot]:
        """Every info file of the domain, read again when the store dir changed.

        The store dir's mtime changes with every snapshot made or removed, by
        any process; LIST_MAX_AGE bounds what a coarse timestamp could hide.
        """
        dom = self._domain(name)
        await self.recover(name)
        store = self._store(dom)
        try:
            mtime = (await trio.to_thread.run_sync(os.stat, store.dir)).st_mtime_ns
        except FileNotFoundError:
            return {}
        cached = self._lists.get(name)
        if cached is not None and cached[0] == mtime and time.monotonic() - cached[1] < LIST_MAX_AGE:
            return cached[2]
        now = time.monotonic()
        snaps = {s.name: s for s in await trio.to_thread.run_sync(store.list)}
        self._lists[name] = (mtime, now, snaps)
        return snaps

    def snapshot_config_path(self, name: str, snapshot: str) -> Path:
        return self._store(self._domain(name)).config_path(snapshot)

    def snapshot_info_path(self, name: str, snapshot: str) -> Path:
        """The snapshot's ``snapshotdata-<name>.xl``, to be served as it is."""
        return self._store(self._domain(name)).info_path(snapshot)

    def current_snapshot(self, name: str) -> str:
        """The snapshot last created or applied, without asking QEMU anything."""
        return self._store(self._domain(name)).current()

    async def disk_snapshots_unlocked(self, name: str) -> list[DiskSnapshot]:
        """Every disk's snapshots read with ``qemu-img -U``, without waiting for the
        domain's lock: for listings that must not stall behind a long operation."""
        result = []
        for disk in self._domain(name).disks:
            result += await images.list_snapshots(disk.dev, disk.file)
        return result

    async def disk_view(self, views: "DiskViews", name: str, snapshot: str, dev: str,
                        vm: bool = True) -> "DiskView":
        """Open a read-only view of disk ``dev`` at a VM snapshot (or a disk snapshot tag).

        Taken under the domain's lock, so it cannot race a delete of the same snapshot.
        """
        dom = self._domain(name)
        disk = next((d for d in dom.disks if d.dev == dev), None)
        if disk is None:
            raise NotFound(f"domain {name!r} has no disk {dev!r}")
        tag = snapshot
        if vm:
            tag = (await trio.to_thread.run_sync(self._store(dom).read, snapshot)).disk_tag
        async with self._operation(name, "disk-view"):
            try:
                return await views.open(disk.file, tag)
            except DiskViewError as err:
                raise _VIEW_ERRORS.get(err.errno, QemuError)(str(err)) from err

    async def vm_snapshot_create(self, name: str, snapshot: str | None = None,
                                 mode: str = "live") -> VmSnapshot:
        """Definition + memory + disks of one instant; the domain keeps its run state."""
        if mode not in MODES:
            raise StateError(f"unknown mode {mode!r}: use live or paused")
        dom = self._domain(name)
        async with self._operation(name, "vm-snapshot-create") as journal:
            snapshot = check_snapshot_name(_now_name() if snapshot is None else snapshot)
            store = self._store(dom)
            if await trio.to_thread.run_sync(store.exists, snapshot):
                raise AlreadyExists(f"VM snapshot {snapshot!r} of {name!r} already exists")
            await self._require_qcow2(dom)
            await self._check_tag_free(dom, snapshot)
            journal.begin("vm-snapshot-create", snapshot=snapshot, tag=snapshot,
                          state=await self._state_now(dom))
            return await self._create(dom, snapshot, snapshot, mode, store.current(), journal)

    async def _state_now(self, dom: DomainDef) -> str:
        if qemu.running_pid(self.dirs, dom.name) is None:
            return "shutoff"
        async with qmp.connect(qemu.Paths(self.dirs, dom.name).qmp) as mon:
            return await qemu.run_state(mon)

    async def _create(self, dom: DomainDef, snapshot: str, tag: str, mode: str,
                      parent: str, journal: Journal, prefix: str = "") -> VmSnapshot:
        """Take a VM snapshot; its steps go to ``journal``, named with ``prefix``."""
        store = self._store(dom)
        await trio.to_thread.run_sync(store.ensure)
        created = int(time.time())
        disks = tuple(d.dev for d in dom.disks)
        if qemu.running_pid(self.dirs, dom.name) is None:
            journal.step(prefix + "disks")
            await self._offline_disk_snapshot(dom, tag)
            snap = VmSnapshot(name=snapshot, creation_time=created, save=None, state="shutoff",
                              parent=parent, disks=disks, tag=tag)
        else:
            save = store.save_path(snapshot)
            try:
                saved = await self._save(dom, tag, save, store.save_tmp_path(snapshot), mode,
                                         journal, prefix)
            except BaseException as err:
                # If QEMU died under the save, its tags are still in the images.
                with trio.CancelScope(shield=True):
                    try:
                        await self._delete_tag_where_present(dom, tag)
                    except SnapfsError as again:
                        logger.error("domain %s: removing disk snapshot %r of a failed save: %s",
                                     dom.name, tag, again)
                if isinstance(err, QemuError) and qemu.running_pid(self.dirs, dom.name) is None:
                    raise QemuError(f"the QEMU of {dom.name!r} exited during the snapshot "
                                    f"({err}); no snapshot was kept") from err
                raise
            snap = VmSnapshot(name=snapshot, creation_time=created, save=save, state=saved.state,
                              parent=parent, disks=disks, save_sha256=saved.sha256,
                              save_size=saved.size, tag=tag, mode=saved.mode,
                              pause_ms=saved.pause_ms)
        try:
            journal.step(prefix + "record")
            await trio.to_thread.run_sync(store.write, snap, dom.to_toml())
            journal.step(prefix + "current")
            if snapshot not in (UNDO, UNDO_NEXT):
                await trio.to_thread.run_sync(store.set_current, snapshot)
        except OSError as err:
            with trio.CancelScope(shield=True):
                await self._forget(dom, snap)
            raise (NoSpace if err.errno == errno.ENOSPC else QemuError)(
                f"writing the info file of {snapshot!r} failed: {err}; nothing was kept") from err
        return snap

    async def _forget(self, dom: DomainDef, snap: VmSnapshot) -> None:
        await self._forget_named(dom, snap.name, snap.disk_tag)

    async def _forget_named(self, dom: DomainDef, name: str, tag: str) -> None:
        """Remove a snapshot, whatever state it is in: info file first, so it is gone at
        once, then its disk snapshots and files (a dead process's journal finishes it)."""
        store = self._store(dom)
        await trio.to_thread.run_sync(store.info_path(name).unlink, True)
        await self._delete_tag_where_present(dom, tag)
        await trio.to_thread.run_sync(store.remove, name)

    async def _delete_tag_where_present(self, dom: DomainDef, tag: str) -> None:
        running = qemu.running_pid(self.dirs, dom.name) is not None
        async with self._maybe_monitor(dom, running) as mon:
            present = {s.dev for s in await self._disk_snapshots(dom, mon) if s.tag == tag}
            await self._delete_disk_tag(dom, tag, mon, only=present)

    async def _save(self, dom: DomainDef, tag: str, save: Path, tmp: Path, mode: str,
                    journal: Journal, prefix: str) -> "_Saved":
        """Disk transaction + save image of a running QEMU, written at ``tmp`` (where
        recovery looks for a partial one), fsynced, then renamed to ``save``.

        The vCPUs stop for the disk transaction; in live mode QEMU resumes them
        as soon as the device state is captured and writes memory while the
        guest runs (background-snapshot), else they stay stopped until memory
        is written. On failure the disk snapshots are deleted, the partial
        image removed and the domain left in the run state it had.
        """
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        hashing = GrowingHash(tmp)
        try:
            async with qmp.connect(qemu.Paths(self.dirs, dom.name).qmp) as mon:
                state = await qemu.run_state(mon)
                tagged = False
                try:
                    live = mode == "live" and state == "running" and self._room_for_live(dom, save)
                    live = await self._prepare_migration(mon, dom.name, live)
                    await mon.send_fd(fd, SAVE_FD)
                    await mon.listen()
                    journal.step(prefix + "stop")
                    await mon.execute("stop")
                    journal.step(prefix + "transaction")
                    await self._disk_transaction(mon, dom, tag)
                    tagged = True
                    journal.step(prefix + "migrate")
                    await mon.execute("migrate", {"uri": f"fd:{SAVE_FD}"})
                    await self._wait_migration(mon, dom.name, fd)
                    journal.step(prefix + "resume")
                    if state != "running":
                        await self._reactivate_paused(mon)
                    await self._resume(mon, state)
                    pause_ms = await self._pause_ms(mon) if state == "running" else 0.0
                    await trio.to_thread.run_sync(os.fsync, fd)
                    size, digest = await trio.to_thread.run_sync(hashing.result)
                except BaseException as err:
                    with trio.CancelScope(shield=True):
                        await self._abort_save(mon, dom, tag if tagged else None, state)
                    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                        raise NoSpace(f"no space left while writing the save image of {tag!r}; "
                                      "partial files removed, domain left as it was") from err
                    raise
        except BaseException:
            hashing.cancel()
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.chmod(tmp, 0o400)
        os.replace(tmp, save)
        return _Saved(state, size, digest, pause_ms, "live" if live else "paused")

    def _room_for_live(self, dom: DomainDef, save: Path) -> bool:
        """Whether a live save surely fits: QEMU 7.2 deadlocks when a background
        snapshot hits ENOSPC (the guest waits on write-protected pages that are
        never copied), where stop-and-save just fails cleanly."""
        stat = os.statvfs(save.parent)
        if stat.f_bavail * stat.f_frsize >= (dom.memory_mib + 64) << 20:
            return True
        logger.warning("domain %s: less free space than its memory in %s; "
                       "saving with the VM paused", dom.name, save.parent)
        return False

    async def _pause_ms(self, mon: qmp.Monitor) -> float:
        """How long the vCPUs stood still, from QEMU's STOP and RESUME event times."""
        with trio.move_on_after(2):
            stop = await mon.wait_event({"STOP"})
            resume = await mon.wait_event({"RESUME"})
            stamp = [float(e["timestamp"]["seconds"]) + e["timestamp"]["microseconds"] / 1e6
                     for e in (stop, resume)]
            return float(round((stamp[1] - stamp[0]) * 1000, 3))
        return -1.0

    async def _prepare_migration(self, mon: qmp.Monitor, name: str, live: bool) -> bool:
        """Set the migration up for a save; returns whether it will be live."""
        if live:
            try:
                await mon.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "background-snapshot", "state": True}]})
            except QemuError as err:
                logger.warning("domain %s: background snapshot refused (%s); "
                               "falling back to stop-and-save", name, err)
                self.record_error(name, f"notice: background snapshot refused ({err}); "
                                  "the snapshot was taken with the VM paused")
                live = False
        if not live:
            # Capabilities persist in the QEMU process: clear what a live save set.
            await mon.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "background-snapshot", "state": False}]})
        await mon.execute("migrate-set-parameters", MIGRATE_PARAMETERS)
        return live

    async def _wait_migration(self, mon: qmp.Monitor, name: str, fd: int) -> dict[str, Any]:
        """Wait for the save to end, publishing how much of it is written to ``fd``."""
        last = 0.0
        while True:
            info = await mon.execute("query-migrate")
            status = info.get("status", "none")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                reason = info.get("error-desc", status)
                if "No space left" in reason:
                    raise NoSpace(f"no space left on the state dir: {reason}")
                raise QemuError(f"migration {status}: {reason}")
            ram = info.get("ram", {})
            if time.monotonic() - last > 0.2 and ram:
                last = time.monotonic()
                # A background snapshot does not count ram.transferred: the
                # image's size is what is written.
                self._report(name, "saving memory", os.fstat(fd).st_size,
                             int(ram.get("total", 0)))
            await trio.sleep(POLL)

    async def _abort_save(self, mon: qmp.Monitor, dom: DomainDef, tag: str | None,
                          state: str) -> None:
        """Best effort after a failed save: migration cancelled, tags gone, vCPUs as before."""
        await self._undo_save(mon, dom, tag)
        try:
            await self._resume(mon, state)
        except SnapfsError as err:
            logger.error("domain %s: resuming after a failed save: %s", dom.name, err)

    async def _undo_save(self, mon: qmp.Monitor, dom: DomainDef, tag: str | None) -> None:
        try:
            info = await mon.execute("query-migrate")
            if info.get("status") in ("active", "setup", "device", "pre-switchover"):
                await mon.execute("migrate_cancel")
                while (await mon.execute("query-migrate")).get("status") not in (
                        "cancelled", "failed", "completed"):
                    await trio.sleep(POLL)
            if tag is not None:
                await self._delete_disk_tag(dom, tag, mon)
        except SnapfsError as err:
            logger.error("domain %s: cleaning up a failed save: %s", dom.name, err)

    async def _reactivate_paused(self, mon: qmp.Monitor) -> None:
        """Give a paused domain its disks back after a completed save.

        A completed migration leaves the disks inactive (DESIGN §7), and QEMU 7.2
        aborts on the next internal-snapshot command; ``cont`` is the only command
        that activates them, so the vCPUs run for the instant between it and ``stop``.
        """
        await mon.execute("cont")
        await mon.execute("stop")

    async def _resume(self, mon: qmp.Monitor, state: str) -> None:
        """Bring the vCPUs back to ``state`` (a failed save must not leave a VM paused)."""
        if state == "running" and await qemu.run_state(mon) != "running":
            await mon.execute("cont")
        self._remember_state(mon.path.stem, state)

    async def vm_snapshot_delete(self, name: str, snapshot: str) -> None:
        dom = self._domain(name)
        async with self._operation(name, "vm-snapshot-delete") as journal:
            snap = await trio.to_thread.run_sync(self._store(dom).read, snapshot)
            self._refuse_exported(dom, {snap.disk_tag})
            journal.begin("vm-snapshot-delete", snapshot=snapshot, tag=snap.disk_tag)
            journal.step("forget")
            await self._forget(dom, snap)

    async def vm_snapshot_apply(self, name: str, snapshot: str, paused: bool = False) -> None:
        """Bring the domain back to ``snapshot``; the state it leaves is kept as ``.undo``.

        The state being replaced is first saved as ``.undo.next``; if the restore
        fails, the domain is brought back from it. On success it becomes ``.undo``.
        """
        dom = self._domain(name)
        async with self._operation(name, "vm-snapshot-apply") as journal:
            store = self._store(dom)
            snap = await trio.to_thread.run_sync(store.read, snapshot)
            target = await self._check_applicable(dom, snap)
            await self._refuse_exported_undo(dom, store)
            await self._require_qcow2(dom)
            state = await self._state_now(dom)
            undo_tag = f".undo-{time.time_ns()}"
            journal.begin("vm-snapshot-apply", snapshot=snapshot, tag=snap.disk_tag,
                          paused=paused, state=state, undo_tag=undo_tag)
            journal.step("undo")
            self._report(name, "saving the state it replaces")
            # Hashing the image and saving the replaced state both take a pass over
            # memory-sized data: do them side by side, before the old QEMU is quit.
            damage: list[SnapfsError] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._verify_sha256, snap, damage)
                undo = await self._create(dom, UNDO_NEXT, undo_tag, "paused", store.current(),
                                          journal, prefix="undo:")
            if damage:
                with trio.CancelScope(shield=True):
                    await self._forget(dom, undo)
                raise damage[0]
            try:
                await self._restore(dom, target, snap, paused, journal)
            except BaseException as err:
                with trio.CancelScope(shield=True):
                    await self._bring_back_undo(dom, undo, err)
                raise
            await self._finish_apply(dom, snapshot, journal)

    async def _finish_apply(self, dom: DomainDef, snapshot: str, journal: Journal) -> None:
        store = self._store(dom)
        journal.step("keep-undo")
        if await trio.to_thread.run_sync(store.exists, UNDO_NEXT):
            if await trio.to_thread.run_sync(store.exists, UNDO):
                await self._forget(dom, await trio.to_thread.run_sync(store.read, UNDO))
            await trio.to_thread.run_sync(store.rename, UNDO_NEXT, UNDO)
        journal.step("current")
        if snapshot != UNDO:
            await trio.to_thread.run_sync(store.set_current, snapshot)

    async def _check_applicable(self, dom: DomainDef, snap: VmSnapshot) -> DomainDef:
        """Everything apply needs is there, at its recorded size, before the domain is
        touched (its sha256 is checked beside the .undo save: ``_verify_sha256``)."""
        store = self._store(dom)
        try:
            text = await trio.to_thread.run_sync(store.config_path(snap.name).read_text)
        except OSError as err:
            raise NotFound(f"snapshot {snap.name!r} has no saved definition: {err}") from None
        target = parse_domain(text, str(store.config_path(snap.name)))
        if snap.save is not None:
            try:
                size = (await trio.to_thread.run_sync(os.stat, snap.save)).st_size
            except OSError as err:
                raise NotFound(f"save image of {snap.name!r} is unreadable: {err}") from None
            if snap.save_size and size != snap.save_size:
                raise ConfigError(f"save image of {snap.name!r} is {size} bytes, "
                                  f"{snap.save_size} were written: it is truncated or damaged")
        for disk in target.disks:
            tags = {s.tag for s in await images.list_snapshots(disk.dev, disk.file)}
            if snap.disk_tag not in tags:
                raise NotFound(f"disk {disk.dev} ({disk.file}) has no snapshot {snap.disk_tag!r}")
        return target

    async def _verify_sha256(self, snap: VmSnapshot, damage: list[SnapfsError]) -> None:
        """Append to ``damage`` if the save image is not the one recorded at create."""
        if snap.save is None or not snap.save_sha256:
            return
        try:
            size, digest = await trio.to_thread.run_sync(sha256_file, snap.save)
        except OSError as err:
            damage.append(NotFound(f"save image of {snap.name!r} is unreadable: {err}"))
            return
        if size != snap.save_size or digest != snap.save_sha256:
            damage.append(ConfigError(f"save image of {snap.name!r} does not match its "
                                      "sha256: it is damaged"))

    async def _restore(self, dom: DomainDef, target: DomainDef, snap: VmSnapshot,
                       paused: bool, journal: Journal) -> None:
        journal.step("quit")
        await qemu.quit(self.dirs, dom.name)
        journal.step("revert")
        self._report(dom.name, "reverting disks")
        for disk in target.disks:
            await images.snapshot_apply(disk.file, snap.disk_tag)
        if snap.save is None:
            return
        journal.step("restore")
        await self._incoming(target, snap.save, paused)

    async def _incoming(self, target: DomainDef, save: Path, paused: bool) -> None:
        formats = await self._formats(target)
        await qemu.start(self.dirs, target, formats, incoming=True)
        try:
            fd = os.open(save, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                async with qmp.connect(qemu.Paths(self.dirs, target.name).qmp) as mon:
                    await mon.send_fd(fd, RESTORE_FD)
                    await mon.execute("migrate-incoming", {"uri": f"fd:{RESTORE_FD}"})
                    await self._wait_incoming(mon, target.name, save)
                    if not paused:
                        await mon.execute("cont")
                    self._remember_state(target.name, "paused" if paused else "running")
            finally:
                os.close(fd)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await qemu.quit(self.dirs, target.name)
            if isinstance(err, QemuError):
                reason = qemu.last_words(self.dirs, target.name) or str(err)
                raise QemuError(f"QEMU could not load the save image {save.name}: {reason}") from err
            raise

    async def _wait_incoming(self, mon: qmp.Monitor, name: str, save: Path) -> None:
        total = save.stat().st_size
        last = 0.0
        while True:
            status = await mon.execute("query-status")
            if status["status"] != "inmigrate":
                break
            if time.monotonic() - last > 0.2:
                last = time.monotonic()
                self._report(name, "loading memory", qemu.read_position(self.dirs, name, save),
                             total)
            await trio.sleep(POLL)
        info = await mon.execute("query-migrate")
        if info.get("status") not in ("completed", None):
            raise QemuError(f"restoring the save image failed: "
                            f"{info.get('error-desc', info.get('status'))}")
        if status["status"] not in ("paused", "prelaunch", "running", "postmigrate"):
            raise QemuError(f"restored QEMU is in state {status['status']!r}")

    async def _bring_back_undo(self, dom: DomainDef, undo: VmSnapshot, err: BaseException) -> None:
        """After a failed restore, return the domain to the state the apply replaced."""
        logger.error("domain %s: apply failed (%s); bringing back the state it replaced",
                     dom.name, err)
        try:
            target = parse_domain(await trio.to_thread.run_sync(
                self._store(dom).config_path(undo.name).read_text), undo.name)
            await qemu.quit(self.dirs, dom.name)
            for disk in target.disks:
                await images.snapshot_apply(disk.file, undo.disk_tag)
            if undo.save is not None:
                await self._incoming(target, undo.save, paused=undo.state == "paused")
        except SnapfsError as again:
            logger.critical("domain %s: bringing back its previous state failed too: %s",
                            dom.name, again)
            if isinstance(err, SnapfsError):
                err.args = (f"{err}; bringing back the previous state failed too: {again}; "
                            f"it is kept as {undo.name}",)
            return
        await self._forget(dom, undo)
        if isinstance(err, SnapfsError):
            err.args = (f"{err}; the domain was brought back to the state it had before "
                        "the apply",)

    # -- recovery ----------------------------------------------------------

    async def _recover(self, name: str, entry: Entry) -> None:
        """Finish or roll back what a dead process left in the journal.

        Creates roll back unless their snapshot was recorded; deletes roll
        forward; an apply rolls back before the old QEMU is quit and forward
        after, bringing back the state it replaced if that fails.
        """
        logger.warning("domain %s: recovering an interrupted %s (last step %r)",
                       name, entry.operation, entry.last)
        facts = entry.facts
        try:
            dom = self._domain(name)
            if entry.operation in ("disk-snapshot-create", "disk-snapshot-delete"):
                if entry.steps:
                    await self._delete_tag_where_present(dom, facts["tag"])
            elif entry.operation == "vm-snapshot-delete":
                await self._forget_named(dom, facts["snapshot"], facts["tag"])
            elif entry.operation == "vm-snapshot-create":
                await self._recover_create(dom, facts["snapshot"], facts["tag"], facts["state"],
                                           entry.reached("current"))
            elif entry.operation == "vm-snapshot-apply":
                await self._recover_apply(dom, entry)
        except SnapfsError as err:
            logger.error("domain %s: recovery of %s failed: %s", name, entry.operation, err)
            self.record_error(name, f"recovery of an interrupted {entry.operation}: {err}")
            return
        self.record_error(name, f"notice: an interrupted {entry.operation} was "
                          f"{'finished' if entry.operation.endswith('delete') else 'recovered'} "
                          f"(it stopped before step {entry.last!r})")

    async def _recover_create(self, dom: DomainDef, snapshot: str, tag: str, state: str,
                              recorded: bool) -> None:
        store = self._store(dom)
        if recorded:
            if snapshot not in (UNDO, UNDO_NEXT):
                await trio.to_thread.run_sync(store.set_current, snapshot)
            return
        await self._settle(dom, state)
        await trio.to_thread.run_sync(store.save_tmp_path(snapshot).unlink, True)
        await self._forget_named(dom, snapshot, tag)

    async def _recover_apply(self, dom: DomainDef, entry: Entry) -> None:
        facts = entry.facts
        store = self._store(dom)
        if not entry.reached("quit"):
            await self._recover_create(dom, UNDO_NEXT, facts["undo_tag"], facts["state"],
                                       recorded=False)
            return
        undo = await trio.to_thread.run_sync(store.read, UNDO_NEXT) \
            if await trio.to_thread.run_sync(store.exists, UNDO_NEXT) else None
        if not entry.reached("keep-undo"):
            snap = await trio.to_thread.run_sync(store.read, facts["snapshot"])
            target = parse_domain(await trio.to_thread.run_sync(
                store.config_path(snap.name).read_text), snap.name)
            journal = Journal(self.dirs, dom.name)
            try:
                await self._restore(dom, target, snap, bool(facts["paused"]), journal)
            except SnapfsError as err:
                if undo is not None:
                    await self._bring_back_undo(dom, undo, err)
                raise
        await self._finish_apply(dom, facts["snapshot"], Journal(self.dirs, dom.name))

    async def _settle(self, dom: DomainDef, state: str) -> None:
        """Bring a QEMU a dead process left mid-save back to ``state``, migration cancelled."""
        if qemu.running_pid(self.dirs, dom.name) is None:
            return
        async with qmp.connect(qemu.Paths(self.dirs, dom.name).qmp) as mon:
            await self._undo_save(mon, dom, None)
            now = (await mon.execute("query-status"))["status"]
            if state == "running" and now != "running":
                await mon.execute("cont")
            elif state == "paused" and now == "postmigrate":
                await self._reactivate_paused(mon)
