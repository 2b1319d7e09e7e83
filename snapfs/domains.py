"""Defining, redefining and undefining domains.

``domain define FILE`` validates a definition and installs it under the config
dir with what it lacks written in, so that it never changes afterwards: a
uuid, each NIC's MAC, and with UEFI firmware the path of the NVRAM it makes in
the state dir (a qcow2 copy of OVMF's variable store, root-only, which every
disk snapshot then takes along). ``--replace`` installs a new version of a
defined, shut-off domain: it keeps the uuid (which names the store of its
snapshots), the NVRAM, and the MACs of the NICs it still has. ``undefine``
removes a shut-off domain's definition, NVRAM and run-dir records, and its
snapshots (save images, info files, disk tags) only when asked; the disks'
image files are the user's and stay.
"""

import logging
import os
import shutil
import subprocess
import uuid as uuidlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import trio

from .config import (
    NVRAM_BUS,
    NVRAM_DEV,
    Dirs,
    Disk,
    DomainDef,
    definition_path,
    random_mac,
    read_definition,
)
from .errors import AlreadyExists, ConfigError, QemuError, StateError
from .files import atomic_write, make_dirs
from .operation import DeleteStep, Operation, OpName
from .qemu import OVMF_VARS, boot_files
from .store import UNDO, UNDO_NEXT, Store, VmSnapshot

__all__ = ["define", "define_domain", "undefine", "nvram_path"]

logger = logging.getLogger(__name__)

OperationFactory = Callable[[str, OpName], AbstractAsyncContextManager[Operation]]


def nvram_path(dirs: Dirs, uuid: str) -> Path:
    """Where ``domain define`` makes a UEFI domain's NVRAM."""
    return dirs.state / "nvram" / f"{uuid}.qcow2"


def _read(source: Path) -> DomainDef:
    return read_definition(source, f"definition file {source} does not exist")


def _complete(dirs: Dirs, domain: DomainDef, old: DomainDef | None, source: Path) -> DomainDef:
    """``domain`` with its uuid, MACs and NVRAM path (kept from ``old``, the definition
    it replaces, or new), once every file it names is found to exist."""
    if old is not None and domain.uuid and domain.uuid != old.uuid:
        raise ConfigError(f"{source}: 'uuid' = {domain.uuid!r} differs from the defined "
                          f"domain's {old.uuid!r}: a replaced definition keeps its uuid")
    uuid = old.uuid if old is not None else domain.uuid or str(uuidlib.uuid4())
    taken = {nic.mac for nic in domain.nics if nic.mac}
    nics = []
    for index, nic in enumerate(domain.nics):
        mac = nic.mac
        if not mac and old is not None and index < len(old.nics) \
                and old.nics[index].mac not in taken:
            mac = old.nics[index].mac
        while not mac or (mac in taken and mac != nic.mac):
            mac = random_mac()
        taken.add(mac)
        nics.append(replace(nic, mac=mac))
    disks = domain.disks
    if domain.firmware == "uefi" and domain.nvram is None:
        kept = old.nvram if old is not None else None
        disks += (Disk(NVRAM_DEV, kept or nvram_path(dirs, uuid), NVRAM_BUS),)
    for disk in domain.user_disks:
        if not disk.file.exists():
            raise ConfigError(f"{source}: disk {disk.dev}: file {disk.file} does not exist")
    if domain.nvram is not None and not domain.nvram.exists():
        raise ConfigError(f"{source}: 'nvram' = {str(domain.nvram)!r} does not exist (leave "
                          "it out and `domain define` makes one)")
    for key, path in boot_files(domain):
        if not path.exists():
            raise ConfigError(f"{source}: {key} {path} does not exist"
                              + (" (install Debian's ovmf package)" if key == "firmware" else ""))
    return replace(domain, uuid=uuid, nics=tuple(nics), disks=disks)


def _make_nvram(path: Path) -> bool:
    """Make a fresh NVRAM at ``path`` unless one is there; true if it was made."""
    if path.exists():
        return False
    if not OVMF_VARS.exists():
        raise ConfigError(f"firmware = \"uefi\" needs OVMF's variable store {OVMF_VARS} "
                          "(install Debian's ovmf package)")
    make_dirs(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            made = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                                   "--", str(OVMF_VARS), str(tmp)], capture_output=True,
                                  text=True, check=False)
        except FileNotFoundError:
            raise QemuError("making the NVRAM: qemu-img is not installed") from None
        if made.returncode != 0:
            raise QemuError(f"making the NVRAM {path}: {made.stderr.strip() or made.returncode}")
        os.chmod(tmp, 0o600)    # UEFI variables can hold secrets
        try:
            os.link(tmp, path)  # never over one made meanwhile
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _install(dirs: Dirs, domain: DomainDef, old: DomainDef | None, source: Path) -> DomainDef:
    """Complete ``domain``, make its NVRAM if it needs one, write its definition
    (blocking: call from a thread)."""
    domain = _complete(dirs, domain, old, source)
    made = domain.nvram is not None and _make_nvram(domain.nvram)
    try:
        make_dirs(dirs.domains, 0o755)
        atomic_write(definition_path(dirs, domain.name), domain.to_toml(), mode=0o644)
    except BaseException:
        if made and domain.nvram is not None:
            domain.nvram.unlink(missing_ok=True)
        raise
    return domain


def define_domain(dirs: Dirs, source: Path) -> DomainDef:
    """Install the definition of a new domain (blocking: call from a thread).

    :raise AlreadyExists: when a domain of that name is defined.
    """
    domain = _read(source)
    path = definition_path(dirs, domain.name)
    if os.path.lexists(path):
        raise AlreadyExists(f"a domain named {domain.name!r} is already defined ({path}); "
                            "`domain define --replace` replaces its definition")
    return _install(dirs, domain, None, source)


async def define(dirs: Dirs, source: Path, replacing: bool,
                 operation: OperationFactory) -> DomainDef:
    """Install the definition in ``source``; over a defined domain of that name only
    if ``replacing``, under the domain's lock (taken by ``operation``).

    :raise AlreadyExists: when the domain is defined and not ``replacing``.
    :raise StateError: when replacing a domain that runs.
    """
    domain = await trio.to_thread.run_sync(_read, source)
    if not (replacing and os.path.lexists(definition_path(dirs, domain.name))):
        return await trio.to_thread.run_sync(define_domain, dirs, source)
    async with operation(domain.name, OpName.DOMAIN_DEFINE) as op:
        if op.vm.running:
            raise StateError(f"domain {domain.name!r} is running: stop it to replace its "
                             "definition; the definition was left as it was")
        return await trio.to_thread.run_sync(_install, dirs, domain, op.vm.definition, source)


async def undefine(op: Operation, with_snapshots: bool) -> int:
    """Remove ``op``'s domain; returns how many VM snapshots went with it.

    :raise StateError: when it runs, or has snapshots and not ``with_snapshots``.
    """
    vm = op.vm
    if vm.running:
        raise StateError(f"domain {vm.name!r} is running: stop it first; nothing was removed")
    store = vm.store
    names = sorted(await trio.to_thread.run_sync(store.names))
    if await trio.to_thread.run_sync(store.exists, UNDO_NEXT):
        names.append(UNDO_NEXT)
    if names and not with_snapshots:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise StateError(f"domain {vm.name!r} has {len(names)} VM snapshot"
                         f"{'s' if len(names) > 1 else ''} ({shown}): `domain undefine "
                         "--with-snapshots` deletes them too; nothing was removed")
    snaps = [await trio.to_thread.run_sync(_read_snapshot, store, name) for name in names]
    for snap in snaps:
        vm.refuse_viewed(snap.disk_tag)
    for snap in snaps:
        # Each is a vm-snapshot-delete of its own, journaled as one: a killed process's
        # successor finishes it, and the snapshots left keep a true lineage.
        op.journal.begin(OpName.VM_SNAPSHOT_DELETE.value, snapshot=snap.name,
                         tag=snap.disk_tag, parent=snap.parent)
        op.journal.step(DeleteStep.REPARENT.value)
        await trio.to_thread.run_sync(store.reparent, snap.name, snap.parent)
        op.journal.step(DeleteStep.FORGET.value)
        await vm.forget(snap.name, snap.disk_tag)
        op.journal.end()
    # The definition goes first: from then on the domain is gone for every process,
    # and what is left to remove is only its files.
    await trio.to_thread.run_sync(_remove, vm.dirs, vm.definition, store.dir)
    return len([n for n in names if n not in (UNDO, UNDO_NEXT)])


def _read_snapshot(store: Store, name: str) -> VmSnapshot:
    try:
        return store.read(name)
    except ConfigError as err:     # damaged: whatever is left of it goes
        return store.damaged(name, str(err))


def _remove(dirs: Dirs, definition: DomainDef, store_dir: Path) -> None:
    definition_path(dirs, definition.name).unlink()
    shutil.rmtree(store_dir, ignore_errors=True)
    # Only the NVRAM snapfs made (kept by a replace to BIOS for the snapshots that
    # need it): one the definition names elsewhere is the user's.
    nvram_path(dirs, definition.uuid).unlink(missing_ok=True)
    for record in dirs.of(definition.name).records():
        record.unlink(missing_ok=True)
