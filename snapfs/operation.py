"""One operation on one domain: its lock, journal, progress, error and trace.

Operations on a domain are serialized across processes by an flock on its
``.lock`` in the run dir (and by a trio lock within a process); different
domains run side by side. While one runs, the domain's ``.op`` says what it
is and how far it got; a failure's message is kept in ``.error`` for
``.status``. The steps each operation records in the journal are the enums
below: the code that takes a step and the recovery that reads it use the same
name.
"""

import enum
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from . import trace
from .config import Dirs, DomainDef
from .domstate import Records
from .errors import SnapfsError
from .files import remove_stale_temporaries
from .journal import Entry, Journal
from .status import Progress
from .tasks import cause
from .vm import Vm

__all__ = ["OpName", "CreateStep", "ApplyStep", "DeleteStep", "DiskCreateStep",
           "DiskDeleteStep", "Operation", "Records", "Locks", "run_operation"]

logger = logging.getLogger(__name__)

LOCK_POLL = 0.02


class OpName(enum.StrEnum):
    DOMAIN_START = "domain-start"
    DOMAIN_STOP = "domain-stop"
    DOMAIN_DEFINE = "domain-define"         # --replace of a defined domain
    DOMAIN_UNDEFINE = "domain-undefine"
    VM_SNAPSHOT_CREATE = "vm-snapshot-create"
    VM_SNAPSHOT_DELETE = "vm-snapshot-delete"
    VM_SNAPSHOT_APPLY = "vm-snapshot-apply"
    DISK_SNAPSHOT_CREATE = "disk-snapshot-create"
    DISK_SNAPSHOT_DELETE = "disk-snapshot-delete"
    DISK_VIEW = "disk-view"
    RECOVERY = "recovery"


class CreateStep(enum.StrEnum):
    """vm-snapshot-create, and the ``.undo`` save of an apply (prefixed ``undo:``)."""

    DISKS = "disks"                 # shut off: qemu-img snapshot -c on each disk
    STOP = "stop"                   # vCPUs stopped
    TRANSACTION = "transaction"     # disk snapshots taken
    MIGRATE = "migrate"             # memory being written
    RESUME = "resume"               # vCPUs back in their state, image complete
    RECORD = "record"               # info file written: the snapshot exists
    CURRENT = "current"


class ApplyStep(enum.StrEnum):
    UNDO = "undo"                   # saving the state it replaces as .undo.next
    QUIT = "quit"                   # the old QEMU is quit: past the point of no return
    REVERT = "revert"               # disks reverted
    RESTORE = "restore"             # memory loading
    KEEP_UNDO = "keep-undo"         # the old .undo removed (its tag is in the journal)
    RENAME_UNDO = "rename-undo"     # .undo.next becomes .undo
    CURRENT = "current"


class DeleteStep(enum.StrEnum):
    REPARENT = "reparent"           # its children get its parent; current moves up
    FORGET = "forget"


class DiskCreateStep(enum.StrEnum):
    SNAPSHOT = "snapshot"


class DiskDeleteStep(enum.StrEnum):
    DELETE = "delete"


UNDO_PREFIX = "undo:"


@dataclass
class Operation:
    """What one running operation has: the domain at run time, its journal, its records."""

    name: OpName
    vm: Vm
    journal: Journal
    records: Records
    progress: Progress
    facts: dict[str, Any] = field(default_factory=dict)

    def begin(self, **facts: Any) -> None:
        """Journal the operation: from here on a killed process is recovered."""
        with trace.phase("journal"):
            self.journal.begin(self.name.value, **facts)

    def step(self, step: enum.StrEnum, prefix: str = "") -> None:
        self.journal.step(prefix + step.value)

    def report(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Publish how far the operation got (``.status``, the CLI's progress bar)."""
        self.progress = replace(self.progress, phase=phase, done=done, total=total)
        self.records.write_progress(self.progress)


Recover = Callable[[Operation, Entry], Awaitable[None]]


class Locks:
    """The trio lock of each domain within this process; the flock serializes processes."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}

    def of(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())


async def _flock(fd: int) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await trio.sleep(LOCK_POLL)


# What to do with a save image an operation set aside (``Vm.discarded``).
Discard = Callable[[Path], None]


@asynccontextmanager
async def run_operation(dirs: Dirs, definition: DomainDef, name: OpName, locks: Locks,
                        recover: Recover, discard: Discard | None = None,
                        ) -> AsyncIterator[Operation]:
    """Hold the domain's lock for operation ``name`` and yield it; a failure is
    recorded as the domain's last_error. A journal left by a process that died
    mid-operation is handed to ``recover`` first. The save images the operation
    set aside are unlinked once the lock is released: handed to ``discard`` (a
    mounted tree unlinks them in the background), else at once."""
    dirs.ensure()
    vm = Vm(dirs, definition)
    records = Records(vm.paths)
    try:
        with trace.tracing(name.value, vm.name):
            async with locks.of(vm.name):
                fd = os.open(vm.paths.lock,
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    with trace.phase("lock"):
                        await _flock(fd)
                    journal = Journal(dirs, vm.name)
                    progress = Progress(name.value, pid=os.getpid(), started=time.time())
                    op = Operation(name, vm, journal, records, progress)
                    entry = journal.read()
                    if entry is not None:
                        with trace.phase("recover"):
                            await recover(op, entry)
                        journal.end()
                    # A killed process's half-written records, whatever it was doing.
                    for where in (dirs.run, dirs.journals, vm.store.dir):
                        remove_stale_temporaries(where)
                    records.write_progress(progress)
                    try:
                        yield op
                        await vm.keep_tables()
                    finally:
                        journal.end()
                        records.end_progress()
                        await vm.aclose()
                finally:
                    os.close(fd)
    except SnapfsError as err:
        records.record_error(f"{name.value}: {err}")
        raise
    except BaseExceptionGroup as group:
        # Work run side by side failed: the error that caused it is the news.
        first = cause(group)
        if isinstance(first, SnapfsError):
            records.record_error(f"{name.value}: {first}")
            raise first from None
        raise
    finally:
        for path in vm.discarded:
            if discard is not None:
                discard(path)
            else:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(partial(path.unlink, missing_ok=True))
