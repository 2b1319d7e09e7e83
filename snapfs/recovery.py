"""Finishing or rolling back what a killed snapfs process left in the journal.

The next process to take the domain's lock finds the entry and, by the last
step it records:

    disk-snapshot-create   rolled back: the tag removed from every disk that has it
    disk-snapshot-delete   rolled forward: the tag removed from every disk
    vm-snapshot-delete     rolled forward: children re-parented, current moved up,
                           info file, disk tags, files removed
    vm-snapshot-create     rolled back unless ``record`` was reached: the QEMU
                           settled (migration cancelled, vCPUs as they were),
                           the partial save image and the tags removed
    vm-snapshot-apply      before ``quit``: rolled back as a create of .undo.next;
                           after: rolled forward (restore again, then keep-undo:
                           the old .undo removed by the tag the journal recorded,
                           unless rename-undo was reached; then the rename and
                           current), and if the restore fails the state it
                           replaced comes back from .undo.next
"""

import logging

import trio

from .apply import Target, bring_back_undo, finish, restore
from .config import parse_domain
from .errors import SnapfsError
from .journal import Entry
from .operation import ApplyStep, CreateStep, Operation, OpName
from .save import settle
from .status import RunState
from .store import UNDO, UNDO_NEXT

__all__ = ["recover"]

logger = logging.getLogger(__name__)


async def recover(op: Operation, entry: Entry) -> None:
    """Finish or roll back ``entry``; the outcome becomes the domain's last_error."""
    name = op.vm.name
    logger.warning("domain %s: recovering an interrupted %s (last step %r)",
                   name, entry.operation, entry.last)
    facts = entry.facts
    try:
        operation = OpName(entry.operation)
        if operation in (OpName.DISK_SNAPSHOT_CREATE, OpName.DISK_SNAPSHOT_DELETE):
            if entry.steps:
                await op.vm.delete_disk_tag(facts["tag"])
        elif operation is OpName.VM_SNAPSHOT_DELETE:
            await trio.to_thread.run_sync(op.vm.store.reparent, facts["snapshot"],
                                          facts.get("parent", ""))
            await op.vm.forget(facts["snapshot"], facts["tag"])
        elif operation is OpName.VM_SNAPSHOT_CREATE:
            await _recover_create(op, facts["snapshot"], facts["tag"], RunState(facts["state"]),
                                  entry.reached(CreateStep.CURRENT))
        elif operation is OpName.VM_SNAPSHOT_APPLY:
            await _recover_apply(op, entry)
    except (SnapfsError, ValueError, KeyError) as err:
        logger.error("domain %s: recovery of %s failed: %s", name, entry.operation, err)
        op.records.record_error(f"recovery of an interrupted {entry.operation}: {err}")
        return
    done = "finished" if entry.operation.endswith("delete") else "recovered"
    op.records.record_error(f"notice: an interrupted {entry.operation} was {done} "
                            f"(it stopped before step {entry.last!r})")


async def _recover_create(op: Operation, snapshot: str, tag: str, state: RunState,
                          recorded: bool) -> None:
    store = op.vm.store
    if recorded:
        if snapshot not in (UNDO, UNDO_NEXT):
            await trio.to_thread.run_sync(store.set_current, snapshot)
        return
    await settle(op.vm, state)
    await trio.to_thread.run_sync(store.save_tmp_path(snapshot).unlink, True)
    await op.vm.forget(snapshot, tag)


async def _recover_apply(op: Operation, entry: Entry) -> None:
    facts = entry.facts
    store = op.vm.store
    if not entry.reached(ApplyStep.QUIT):
        await _recover_create(op, UNDO_NEXT, facts["undo_tag"], RunState(facts["state"]),
                              recorded=False)
        return
    undo = await trio.to_thread.run_sync(store.read, UNDO_NEXT) \
        if await trio.to_thread.run_sync(store.exists, UNDO_NEXT) else None
    keep_undo = bool(facts.get("undo", True))
    if not entry.reached(ApplyStep.KEEP_UNDO):
        snap = await trio.to_thread.run_sync(store.read, facts["snapshot"])
        text = await trio.to_thread.run_sync(store.config_path(snap.name).read_text)
        target = Target(snap, parse_domain(text, snap.name), {})
        try:
            await restore(op, target, bool(facts["paused"]))
        except SnapfsError as err:
            if undo is not None:
                await bring_back_undo(op, undo, err)
            raise
    await finish(op, facts["snapshot"], keep_undo, facts.get("old_undo_tag", ""),
                 renaming=entry.reached(ApplyStep.RENAME_UNDO))
