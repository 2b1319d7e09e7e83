"""Applying a VM snapshot: check, keep what it replaces, restore, or bring it back.

    check      everything the snapshot needs is there, at its recorded size,
               before the domain is touched (its sha256 is checked beside the
               .undo save, both being a pass over memory-sized data)
    undo       the state being replaced saved as ``.undo.next`` (a paused save:
               the old QEMU quits right after), unless the apply is --no-undo
    quit       the old QEMU quits: from here on the apply goes forward
    revert     ``qemu-img snapshot -a`` on each disk
    restore    QEMU started with ``-incoming defer``; ``migrate-incoming`` from
               the save image through a file descriptor; ``cont`` unless paused
    keep-undo  ``.undo.next`` becomes ``.undo`` (or, --no-undo, the old ``.undo``
               goes: it is no longer what the last apply replaced)
    current    the snapshot becomes current

If the restore fails the domain is brought back from ``.undo.next``.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from . import images, trace
from .config import DomainDef, parse_domain
from .errors import Busy, ConfigError, NotFound, QemuError, SnapfsError
from .images import DiskSnapshot
from .operation import UNDO_PREFIX, ApplyStep, Operation
from .procfs import file_position
from .qemu import last_words
from .save import PROGRESS_EVERY, SaveMode, create, seal_save
from .saves import CheckedSaves, sha256_file
from .status import RunState
from .store import UNDO, UNDO_NEXT, VmSnapshot
from .tasks import side_by_side
from .vm import Vm

__all__ = ["Target", "apply", "check", "refuse_viewed_undo", "restore",
           "bring_back_undo", "finish"]

logger = logging.getLogger(__name__)

RESTORE_FD = "snapfs-restore"


@dataclass(frozen=True)
class Target:
    """A snapshot found applicable: its info, its definition, each disk's table."""

    snap: VmSnapshot
    definition: DomainDef
    tables: dict[str, list[DiskSnapshot]]


async def check(vm: Vm, snap: VmSnapshot) -> Target:
    """:raise NotFound, ConfigError: when something the snapshot needs is missing or
    not the size it was written at."""
    path = vm.store.config_path(snap.name)
    try:
        text = await trio.to_thread.run_sync(path.read_text)
    except OSError as err:
        raise NotFound(f"snapshot {snap.name!r} has no saved definition: {err}") from None
    definition = parse_domain(text, str(path))
    if snap.save is not None:
        try:
            size = (await trio.to_thread.run_sync(os.stat, snap.save)).st_size
        except OSError as err:
            raise NotFound(f"save image of {snap.name!r} is unreadable: {err}") from None
        if snap.save_size and size != snap.save_size:
            raise ConfigError(f"save image of {snap.name!r} is {size} bytes, "
                              f"{snap.save_size} were written: it is truncated or damaged")
    tables = {}
    for disk in definition.disks:
        info = await vm.image_info(disk)
        tables[disk.dev] = [DiskSnapshot.from_qemu(disk.dev, s) for s in info.get("snapshots", [])]
        if snap.disk_tag not in {s.tag for s in tables[disk.dev]}:
            raise NotFound(f"disk {disk.dev} ({disk.file}) has no snapshot {snap.disk_tag!r}")
    return Target(snap, definition, tables)


async def refuse_viewed_undo(vm: Vm) -> None:
    """An apply replaces ``.undo`` and so deletes its disk snapshots: not while viewed."""
    if not await trio.to_thread.run_sync(vm.store.exists, UNDO):
        return
    undo = await trio.to_thread.run_sync(vm.store.read, UNDO)
    dev = vm.viewed(undo.disk_tag)
    if dev:
        raise Busy(f"{UNDO} (what the last apply replaced) is open as a disk view "
                   f"({dev}), and this apply would replace it; close it first")


async def apply(op: Operation, target: Target, paused: bool, keep_undo: bool) -> None:
    """Bring ``op``'s domain to ``target``; see the module docstring for the steps."""
    vm, snap = op.vm, target.snap
    state = await vm.run_state()
    undo_tag = f".undo-{time.time_ns()}"
    old = await vm.stored_tag(UNDO)
    op.begin(snapshot=snap.name, tag=snap.disk_tag, paused=paused, state=state.value,
             undo_tag=undo_tag, undo=keep_undo, old_undo_tag=old)
    undo: VmSnapshot | None = None
    op.step(ApplyStep.UNDO)
    damage: list[SnapfsError] = []
    with trace.phase("check sha256" + (" + save .undo" if keep_undo else "")):
        if keep_undo:
            op.report("saving the state it replaces")
            # Hashing the image and saving the replaced state are both a pass over
            # memory-sized data: side by side, before the old QEMU is quit.
            undo = await side_by_side(
                lambda: create(op, UNDO_NEXT, undo_tag, SaveMode.PAUSED, vm.store.current(),
                               prefix=UNDO_PREFIX, seal=False),
                lambda: _verify_sha256(vm, snap, damage))
        else:
            op.report("checking the save image")
            await _verify_sha256(vm, snap, damage)
    if damage:
        if undo is not None:
            with trio.CancelScope(shield=True):
                await vm.forget(undo.name, undo.disk_tag)
        raise damage[0]
    # The .undo image is read back from the page cache if the restore fails; its
    # sha256 and its flush to disk can wait until the apply ends, so they run while
    # QEMU loads the snapshot (a core QEMU's single loading thread leaves free).
    sealed: list[tuple[int, str]] = []
    beside = []
    if undo is not None and undo.save is not None:
        undo_save = undo.save

        async def seal() -> None:
            sealed.append(await seal_save(undo_save))
        beside.append(seal)
    try:
        await side_by_side(lambda: restore(op, target, paused), *beside)
    except BaseException as err:
        with trio.CancelScope(shield=True):
            if undo is not None:
                await bring_back_undo(op, undo, err)
            elif isinstance(err, SnapfsError):
                err.args = (f"{err}; no .undo was kept (--no-undo): the domain is shut off",)
        raise
    await finish(op, snap.name, keep_undo, old, sealed[0][1] if sealed else "")


async def _verify_sha256(vm: Vm, snap: VmSnapshot, damage: list[SnapfsError]) -> None:
    """Append to ``damage`` if the save image is not the one recorded at create."""
    if snap.save is None or not snap.save_sha256:
        return
    checked = CheckedSaves(vm.paths.checked)
    if await trio.to_thread.run_sync(checked.holds, snap.save, snap.save_sha256):
        return
    trace.count("sha256 of a save image")
    try:
        size, digest = await trio.to_thread.run_sync(sha256_file, snap.save)
    except OSError as err:
        damage.append(NotFound(f"save image of {snap.name!r} is unreadable: {err}"))
        return
    if size != snap.save_size or digest != snap.save_sha256:
        damage.append(ConfigError(f"save image of {snap.name!r} does not match its "
                                  "sha256: it is damaged"))
        return
    await trio.to_thread.run_sync(checked.add, snap.save, digest)


async def restore(op: Operation, target: Target, paused: bool) -> None:
    """Quit the domain's QEMU, revert its disks, load the snapshot's memory."""
    vm, snap = op.vm, target.snap
    op.step(ApplyStep.QUIT)
    with trace.phase("quit the old QEMU"):
        await vm.quit()
    op.step(ApplyStep.REVERT)
    op.report("reverting disks")
    with trace.phase("revert disks (qemu-img snapshot -a)"):
        for disk in target.definition.disks:
            await images.snapshot_apply(disk.file, snap.disk_tag, target.tables.get(disk.dev))
        vm.forget_images()
    if snap.save is None:
        return
    op.step(ApplyStep.RESTORE)
    await _incoming(op, target.definition, snap.save, paused)


async def _incoming(op: Operation, definition: DomainDef, save: Path, paused: bool) -> None:
    vm = op.vm
    with trace.phase("start QEMU -incoming"):
        await vm.start(definition, incoming=True)
    try:
        fd = os.open(save, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            mon = await vm.monitor()
            await mon.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            await mon.send_fd(fd, RESTORE_FD)
            await mon.listen()
            with trace.phase("incoming migration (QEMU loads memory)"):
                await mon.execute("migrate-incoming", {"uri": f"fd:{RESTORE_FD}"})
                await _wait_incoming(op, save)
            if not paused:
                await mon.execute("cont")
            vm.remember_state(RunState.PAUSED if paused else RunState.RUNNING)
        finally:
            os.close(fd)
    except BaseException as err:
        with trio.CancelScope(shield=True):
            await vm.quit()
        if isinstance(err, QemuError):
            reason = last_words(vm.paths) or str(err)
            raise QemuError(f"QEMU could not load the save image {save.name}: {reason}") from err
        raise


async def _wait_incoming(op: Operation, save: Path) -> None:
    """Wait until QEMU has loaded the image, publishing how far it has read."""
    mon = await op.vm.monitor()
    total = save.stat().st_size
    while True:
        with trio.move_on_after(PROGRESS_EVERY):
            while (await mon.wait_event({"MIGRATION"})).get("data", {}).get(
                    "status") not in ("completed", "failed", "cancelled"):
                pass
        status = await mon.execute("query-status")
        if status["status"] != "inmigrate":
            break
        pid = op.vm.pid()
        op.report("loading memory", file_position(pid, save) if pid else 0, total)
    info = await mon.execute("query-migrate")
    if info.get("status") not in ("completed", None):
        raise QemuError(f"restoring the save image failed: "
                        f"{info.get('error-desc', info.get('status'))}")
    if status["status"] not in ("paused", "prelaunch", "running", "postmigrate"):
        raise QemuError(f"restored QEMU is in state {status['status']!r}")


async def bring_back_undo(op: Operation, undo: VmSnapshot, err: BaseException) -> None:
    """After a failed restore, return the domain to the state the apply replaced."""
    vm = op.vm
    logger.error("domain %s: apply failed (%s); bringing back the state it replaced",
                 vm.name, err)
    try:
        text = await trio.to_thread.run_sync(vm.store.config_path(undo.name).read_text)
        definition = parse_domain(text, undo.name)
        await vm.quit()
        for disk in definition.disks:
            await images.snapshot_apply(disk.file, undo.disk_tag)
        vm.forget_images()
        if undo.save is not None:
            await _incoming(op, definition, undo.save, paused=undo.state == "paused")
    except SnapfsError as again:
        logger.critical("domain %s: bringing back its previous state failed too: %s",
                        vm.name, again)
        if isinstance(err, SnapfsError):
            err.args = (f"{err}; bringing back the previous state failed too: {again}; "
                        f"it is kept as {undo.name}",)
        return
    await vm.forget(undo.name, undo.disk_tag)
    if isinstance(err, SnapfsError):
        err.args = (f"{err}; the domain was brought back to the state it had before "
                    "the apply",)


async def finish(op: Operation, snapshot: str, keep_undo: bool, old_undo_tag: str,
                 undo_sha256: str = "", renaming: bool = False) -> None:
    """The old ``.undo`` goes (step keep-undo; by ``old_undo_tag``, recorded when the
    apply began, as its info file may already be gone), then ``.undo.next`` becomes
    ``.undo`` (step rename-undo; with the sha256 of its image when known: an apply
    finished by recovery keeps only its size); the snapshot becomes current.
    ``renaming``: recovery found the rename begun, so the old one is gone."""
    store = op.vm.store
    has_next = await trio.to_thread.run_sync(store.exists, UNDO_NEXT)
    op.step(ApplyStep.KEEP_UNDO)
    with trace.phase("keep .undo"):
        if (has_next or not keep_undo) and old_undo_tag and not renaming:
            await op.vm.forget(UNDO, old_undo_tag)
        op.step(ApplyStep.RENAME_UNDO)
        if has_next:
            await trio.to_thread.run_sync(store.rename, UNDO_NEXT, UNDO, undo_sha256)
            if undo_sha256:
                await trio.to_thread.run_sync(CheckedSaves(op.vm.paths.checked).add,
                                              store.save_path(UNDO), undo_sha256)
    op.step(ApplyStep.CURRENT)
    if snapshot != UNDO:
        await trio.to_thread.run_sync(store.set_current, snapshot)
