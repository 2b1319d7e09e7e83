"""The read-only answers that files can give, without trio: the CLI's fast path.

``domain list``, ``domain status``, ``vm-snapshot-list`` and
``disk-snapshot-list`` are asked from shells and scripts, often in a loop.
Importing trio and the engine takes longer than answering (about 100 ms
against a few), so the CLI first asks here, with nothing but the standard
library and the modules below that need no trio:

    definitions, info files      config, store
    the disks' snapshot tables   tables (the copy in the run dir)
    run state, progress, errors  domstate (files, /proc, one QMP query-status)

A function answers None when files cannot tell: a journal that a dead process
left must be recovered first, or no disk table is kept for the images as they
are now. The CLI then asks the engine, which recovers, reads the tables and
keeps them for the next time. The engine answers ``domain status`` with
``domain_status`` here too (from a worker thread), so both say the same.
"""

from .config import Dirs, DomainDef, load_domain
from .domstate import Records, observed_state
from .journal import Journal
from .status import DomainStatus
from .store import Store, VmSnapshot
from .tables import DiskSnapshot, Infos, TableCopy, check_tags, table_of

__all__ = ["domain_status", "statuses", "vm_snapshots", "disk_snapshots"]


def domain_status(dirs: Dirs, definition: DomainDef) -> DomainStatus:
    """The domain's run state, current snapshot, operation in progress and last error.

    Does not wait for a running operation: while one holds the monitor, the
    state is the one that operation last recorded.
    """
    paths = dirs.of(definition.name)
    records = Records(paths)
    op = records.read_progress()
    state, reason = observed_state(paths, busy=op is not None)
    return DomainStatus(definition.name, state.value, Store(dirs, definition.uuid).current(),
                        op, records.last_error(), reason)


def _unrecovered(dirs: Dirs, name: str) -> bool:
    """Whether a dead process left an operation in the journal (a live one's is its own)."""
    return Journal(dirs, name).pending() and Records(dirs.of(name)).read_progress() is None


def statuses(dirs: Dirs, names: list[str]) -> list[DomainStatus] | None:
    definitions = [load_domain(dirs, name) for name in names]
    if any(_unrecovered(dirs, name) for name in names):
        return None
    return [domain_status(dirs, definition) for definition in definitions]


def vm_snapshots(dirs: Dirs, name: str) -> list[VmSnapshot] | None:
    """The domain's VM snapshots, oldest first, damaged ones marked as such."""
    definition = load_domain(dirs, name)
    infos = _disk_infos(dirs, definition)
    if infos is None:
        return None
    table = table_of(infos)
    return [check_tags(snap, table) for snap in Store(dirs, definition.uuid).list()]


def disk_snapshots(dirs: Dirs, name: str) -> list[DiskSnapshot] | None:
    """Every internal snapshot of every disk, in disk order then table order."""
    infos = _disk_infos(dirs, load_domain(dirs, name))
    return None if infos is None else list(table_of(infos).listed)


def _disk_infos(dirs: Dirs, definition: DomainDef) -> Infos | None:
    """The disks' tables as last kept in the run dir; None when only the engine can
    tell (a killed operation to recover, or no valid copy)."""
    if _unrecovered(dirs, definition.name):
        return None
    return TableCopy(dirs.of(definition.name), definition).load()
