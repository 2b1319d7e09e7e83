"""The save protocol: a VM snapshot of a domain, and undoing a save cut short.

A running domain's snapshot: stop the vCPUs; one disk transaction; migrate
memory and device state to a file descriptor passed with ``getfd``; resume.
Live (QEMU's ``background-snapshot``), the vCPUs run again as soon as the
device state is captured and memory is written while the guest runs, so the
pause does not grow with memory; paused, they stay stopped until memory is
written. A shut-off domain gets a disk snapshot and no save image.

Facts of QEMU 7.2 this code follows:

- Migration defaults throttle a save to 128 MiB/s and send a paused VM's RAM
  in one step under QEMU's global lock: lift the cap, keep the steps short.
- A completed migration leaves the disks inactive: an internal snapshot then
  fails (or QEMU aborts), and only ``cont`` activates them again. So the disk
  transaction is taken while stopped, before ``migrate``, and a paused domain
  runs for the instant between ``cont`` and ``stop`` after its save.
- A background snapshot that hits ENOSPC deadlocks the guest (it waits on
  write-protected pages that are never copied): live mode only with room.
- A background snapshot resumes a paused VM at its end and crashes QEMU when
  taken in ``prelaunch``: live mode only for a running domain.
"""

import enum
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import qmp, trace
from .errors import NoSpace, QemuError, SnapfsError
from .operation import CreateStep, Operation
from .saves import CheckedSaves, GrowingHash, sha256_file
from .status import RunState
from .store import UNDO, UNDO_NEXT, VmSnapshot
from .vm import Vm

__all__ = ["SaveMode", "create", "seal_save", "settle"]

logger = logging.getLogger(__name__)

SAVE_FD = "snapfs-save"
MIGRATE_PARAMETERS = {"max-bandwidth": 1 << 40, "downtime-limit": 5}
# How often the bytes written are published while QEMU writes memory.
PROGRESS_EVERY = 0.2
MIGRATION_ENDED = ("completed", "failed", "cancelled")
MIGRATION_ACTIVE = ("active", "setup", "device", "pre-switchover")
SETTLE_TIMEOUT = 10.0


class SaveMode(enum.StrEnum):
    LIVE = "live"           # memory written while the guest runs
    PAUSED = "paused"       # stop-and-save


@dataclass(frozen=True)
class _Saved:
    state: RunState
    size: int
    sha256: str
    pause_ms: float
    mode: SaveMode


async def create(op: Operation, snapshot: str, tag: str, mode: SaveMode, parent: str,
                 prefix: str = "", seal: bool = True) -> VmSnapshot:
    """Take VM snapshot ``snapshot`` (disk tag ``tag``) of ``op``'s domain; its steps
    go to the journal named with ``prefix``. On failure nothing of it is kept and
    the domain keeps its run state. ``seal=False`` leaves the save image's sha256
    and fsync to the caller (``seal_save``), to overlap them with other work."""
    vm = op.vm
    store = vm.store
    await trio.to_thread.run_sync(store.ensure)
    created = int(time.time())
    disks = tuple(d.dev for d in vm.definition.disks)
    if not vm.running:
        op.step(CreateStep.DISKS, prefix)
        with trace.phase("disk snapshots (qemu-img)"):
            await vm.snapshot_disks(tag)
        snap = VmSnapshot(name=snapshot, creation_time=created, save=None, state="shutoff",
                          parent=parent, disks=disks, tag=tag)
    else:
        save = store.save_path(snapshot)
        try:
            saved = await _save(op, tag, save, store.save_tmp_path(snapshot), mode, prefix,
                                seal)
        except BaseException as err:
            # If QEMU died under the save, its tags are still in the images.
            with trio.CancelScope(shield=True):
                try:
                    await vm.delete_disk_tag(tag)
                except SnapfsError as again:
                    logger.error("domain %s: removing disk snapshot %r of a failed save: %s",
                                 vm.name, tag, again)
            if isinstance(err, QemuError) and not vm.running:
                raise QemuError(f"the QEMU of {vm.name!r} exited during the snapshot "
                                f"({err}); no snapshot was kept") from err
            raise
        snap = VmSnapshot(name=snapshot, creation_time=created, save=save,
                          state=saved.state.value, parent=parent, disks=disks,
                          save_sha256=saved.sha256, save_size=saved.size, tag=tag,
                          mode=saved.mode.value, pause_ms=saved.pause_ms)
    try:
        op.step(CreateStep.RECORD, prefix)
        with trace.phase("record"):
            await trio.to_thread.run_sync(store.write, snap, vm.definition.to_toml())
        op.step(CreateStep.CURRENT, prefix)
        if snapshot not in (UNDO, UNDO_NEXT):
            await trio.to_thread.run_sync(store.set_current, snapshot)
    except OSError as err:
        with trio.CancelScope(shield=True):
            await vm.forget(snap.name, snap.disk_tag)
        raise (NoSpace if err.errno == errno.ENOSPC else QemuError)(
            f"writing the info file of {snapshot!r} failed: {err}; nothing was kept") from err
    return snap


async def _save(op: Operation, tag: str, save: Path, tmp: Path, mode: SaveMode,
                prefix: str, seal: bool) -> _Saved:
    """Disk transaction + save image of a running QEMU, written at ``tmp`` (where
    recovery looks for a partial one), fsynced, then renamed to ``save``.

    On failure the disk snapshots are deleted, the partial image removed and
    the domain left in the run state it had.
    """
    vm = op.vm
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    hashing = GrowingHash(tmp) if seal else None
    try:
        mon = await vm.monitor()
        state = await vm.run_state()
        tagged = False
        try:
            live = mode is SaveMode.LIVE and state is RunState.RUNNING and _room_for_live(vm, save)
            with trace.phase("prepare migration"):
                live = await _prepare_migration(op, mon, live)
                await mon.send_fd(fd, SAVE_FD)
                await mon.listen()
            op.step(CreateStep.STOP, prefix)
            with trace.phase("stop"):
                await mon.execute("stop")
            op.step(CreateStep.TRANSACTION, prefix)
            with trace.phase("disk transaction"):
                await vm.snapshot_disks(tag)
            tagged = True
            op.step(CreateStep.MIGRATE, prefix)
            with trace.phase("migrate (QEMU writes memory)"):
                await mon.execute("migrate", {"uri": f"fd:{SAVE_FD}"})
                await _wait_migration(op, mon, fd)
            op.step(CreateStep.RESUME, prefix)
            with trace.phase("resume"):
                await _resume(vm, mon, state)
            pause_ms = await _pause_ms(mon) if state is RunState.RUNNING else 0.0
            if hashing is not None:
                with trace.phase("sha256 (rest)"):
                    size, digest = await trio.to_thread.run_sync(hashing.result)
                with trace.phase("fsync save image"):
                    await trio.to_thread.run_sync(os.fsync, fd)
            else:
                size, digest = os.fstat(fd).st_size, ""
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await _abort_save(vm, mon, tag if tagged else None, state)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise NoSpace(f"no space left while writing the save image of {tag!r}; "
                              "partial files removed, domain left as it was") from err
            raise
    except BaseException:
        if hashing is not None:
            hashing.cancel()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.chmod(tmp, 0o400)
    os.replace(tmp, save)
    if digest:
        # Hashed as QEMU wrote it: an apply need not read it again while it is untouched.
        CheckedSaves(vm.paths.checked).add(save, digest)
    return _Saved(state, size, digest, pause_ms, SaveMode.LIVE if live else SaveMode.PAUSED)


def _room_for_live(vm: Vm, save: Path) -> bool:
    """Whether a live save surely fits (a background snapshot deadlocks on ENOSPC,
    where stop-and-save just fails cleanly)."""
    stat = os.statvfs(save.parent)
    if stat.f_bavail * stat.f_frsize >= (vm.definition.memory_mib + 64) << 20:
        return True
    logger.warning("domain %s: less free space than its memory in %s; "
                   "saving with the VM paused", vm.name, save.parent)
    return False


async def _pause_ms(mon: qmp.Monitor) -> float:
    """How long the vCPUs stood still, from QEMU's STOP and RESUME event times."""
    with trio.move_on_after(2):
        stop = await mon.wait_event({"STOP"})
        resume = await mon.wait_event({"RESUME"})
        stamp = [float(e["timestamp"]["seconds"]) + e["timestamp"]["microseconds"] / 1e6
                 for e in (stop, resume)]
        return float(round((stamp[1] - stamp[0]) * 1000, 3))
    return -1.0


async def _prepare_migration(op: Operation, mon: qmp.Monitor, live: bool) -> bool:
    """Set the migration up for a save; returns whether it will be live."""
    capabilities = [{"capability": "events", "state": True}]
    if live:
        try:
            await mon.execute("migrate-set-capabilities", {"capabilities": [
                *capabilities, {"capability": "background-snapshot", "state": True}]})
        except QemuError as err:
            logger.warning("domain %s: background snapshot refused (%s); "
                           "falling back to stop-and-save", op.vm.name, err)
            op.records.record_error(f"notice: background snapshot refused ({err}); "
                                    "the snapshot was taken with the VM paused")
            live = False
    if not live:
        # Capabilities persist in the QEMU process: clear what a live save set.
        await mon.execute("migrate-set-capabilities", {"capabilities": [
            *capabilities, {"capability": "background-snapshot", "state": False}]})
    await mon.execute("migrate-set-parameters", MIGRATE_PARAMETERS)
    return live


async def _wait_migration(op: Operation, mon: qmp.Monitor, fd: int) -> dict[str, Any]:
    """Wait for the save to end, publishing how much of it is written to ``fd`` (a
    background snapshot does not count ``ram.transferred``: the image's size is
    what is written). QEMU's MIGRATION event wakes the wait at once; the status
    is also asked every PROGRESS_EVERY seconds, in case an event was missed."""
    while True:
        with trio.move_on_after(PROGRESS_EVERY):
            while (await mon.wait_event({"MIGRATION"})).get("data", {}).get(
                    "status") not in MIGRATION_ENDED:
                pass
        info = await mon.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            await _settled(mon)
            return dict(info)
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", status)
            if "No space left" in reason:
                raise NoSpace(f"no space left on the state dir: {reason}")
            raise QemuError(f"migration {status}: {reason}")
        op.report("saving memory", os.fstat(fd).st_size, int(info.get("ram", {}).get("total", 0)))


async def _abort_save(vm: Vm, mon: qmp.Monitor, tag: str | None, state: RunState) -> None:
    """Best effort after a failed save: migration ended, vCPUs (and disks) as before,
    then the tags gone: a block command on the disks a completed migration left
    inactive makes QEMU 7.2 abort, so they are active again first."""
    await _end_migration(vm, mon)
    try:
        await _resume(vm, mon, state)
    except SnapfsError as err:
        logger.error("domain %s: resuming after a failed save: %s", vm.name, err)
    if tag is not None:
        try:
            await vm.delete_disk_tag(tag)
        except SnapfsError as err:
            logger.error("domain %s: removing the disk snapshots of a failed save: %s",
                         vm.name, err)


async def _end_migration(vm: Vm, mon: qmp.Monitor) -> None:
    """End a save still in progress: a stop-and-save is cancelled; a background
    snapshot is let run to its end, because QEMU 7.2 cancels one without taking
    its write protection off the guest's memory, and every later save of that
    QEMU then fails (``uffd_change_protection() failed … errno=25``)."""
    try:
        info = await mon.execute("query-migrate")
        if info.get("status") in MIGRATION_ACTIVE:
            if not await _background(mon):
                await mon.execute("migrate_cancel")
            else:
                logger.warning("domain %s: letting an interrupted live save finish", vm.name)
            while (await mon.execute("query-migrate")).get("status") not in MIGRATION_ENDED:
                await trio.sleep(0.01)
        await _settled(mon)
    except SnapfsError as err:
        logger.error("domain %s: ending a failed save: %s", vm.name, err)


async def _settled(mon: qmp.Monitor) -> str:
    """QEMU's run state once a migration's end has been taken in: its status says
    ``completed`` while the vCPUs are still in ``finish-migrate``, where ``cont``
    is refused ("Migration is not finalized yet")."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        while (status := (await mon.execute("query-status"))["status"]) == "finish-migrate":
            await trio.sleep(0.002)
        return str(status)
    raise QemuError("QEMU stayed in finish-migrate after the save ended")


async def _background(mon: qmp.Monitor) -> bool:
    capabilities = await mon.execute("query-migrate-capabilities")
    return any(c["capability"] == "background-snapshot" and c["state"] for c in capabilities)


async def _reactivate_paused(mon: qmp.Monitor) -> None:
    """Give a paused domain its disks back after a completed save (see the module
    docstring: ``cont`` is the only command that activates them)."""
    await mon.execute("cont")
    await mon.execute("stop")


async def _resume(vm: Vm, mon: qmp.Monitor, state: RunState) -> None:
    """Bring the vCPUs back to ``state`` (a failed save must not leave a VM paused),
    and a paused domain's disks back to life after a completed save."""
    now = (await mon.execute("query-status"))["status"]
    if state is RunState.RUNNING and now != "running":
        await mon.execute("cont")
    elif state is RunState.PAUSED and now == "postmigrate":
        await _reactivate_paused(mon)
    vm.remember_state(state)


async def seal_save(save: Path) -> tuple[int, str]:
    """The size and sha256 of a save image written with ``seal=False``, made durable."""
    def seal() -> tuple[int, str]:
        size, digest = sha256_file(save, writeback=True)
        fd = os.open(save, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, digest

    with trace.phase("sha256 + fsync of the save image"):
        return await trio.to_thread.run_sync(seal)


async def settle(vm: Vm, state: RunState) -> None:
    """Bring a QEMU a dead process left mid-save back to ``state``, migration cancelled."""
    if not vm.running:
        return
    mon = await vm.monitor()
    await _end_migration(vm, mon)
    await _resume(vm, mon, state)
