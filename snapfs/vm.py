"""One domain at run time, for the length of one operation.

A ``Vm`` holds what every step of an operation needs and would otherwise
derive again: the definition, the run-dir paths, the store, the image facts
``qemu-img info`` gave (read once per disk), and one QMP session to its QEMU,
opened on first use and kept until the operation ends (QEMU serves one client
at a time, and each session costs a connection and a handshake).
"""

import logging
import time
from pathlib import Path
from typing import Any

import trio

from . import images, qemu, qmp, trace
from .config import Dirs, Disk, DomainDef
from .diskview import exported
from .domstate import Records, running_pid
from .errors import AlreadyExists, Busy, NotSupported, SnapfsError
from .images import DiskSnapshot
from .status import RunState
from .store import Store
from .tables import TableCopy

__all__ = ["Vm"]

logger = logging.getLogger(__name__)


class Vm:
    """Domain ``definition`` over the directories ``dirs``."""

    def __init__(self, dirs: Dirs, definition: DomainDef) -> None:
        self.dirs = dirs
        self.definition = definition
        self.name = definition.name
        self.paths = dirs.of(definition.name)
        self.store = Store(dirs, definition.uuid)
        self._monitor: qmp.Monitor | None = None
        self._images: dict[Path, dict[str, Any]] = {}
        self._formats: dict[Path, str] = {}
        self._nodes: dict[str, dict[str, Any]] | None = None
        self._tables_changed = False
        self.discarded: list[Path] = []     # save images to unlink once the operation ends

    # -- the QEMU process ------------------------------------------------------

    def pid(self) -> int | None:
        return running_pid(self.paths)

    @property
    def running(self) -> bool:
        """Whether its QEMU is alive (running or paused)."""
        return self.pid() is not None

    async def monitor(self) -> qmp.Monitor:
        """The operation's QMP session, opened on first use."""
        if self._monitor is None:
            self._monitor = await qmp.open_monitor(self.paths.qmp)
        return self._monitor

    async def close_monitor(self) -> None:
        mon, self._monitor = self._monitor, None
        if mon is not None:
            await mon.aclose()

    async def aclose(self) -> None:
        await self.close_monitor()

    async def run_state(self) -> RunState:
        """Shut off, or what QEMU says: running, or paused in any stopped state
        (paused, inmigrate, postmigrate...)."""
        if not self.running:
            return RunState.SHUTOFF
        status = await (await self.monitor()).execute("query-status")
        return RunState.RUNNING if status.get("running") else RunState.PAUSED

    def remember_state(self, state: RunState) -> None:
        """Keep the state for ``domain status`` while an operation holds the monitor."""
        Records(self.paths).remember_state(state)

    async def start(self, definition: DomainDef | None = None, *, paused: bool = False,
                    incoming: bool = False) -> None:
        """Start QEMU from ``definition`` (the domain's own by default)."""
        target = definition or self.definition
        await self.close_monitor()
        self.forget_images()
        await qemu.start(self.paths, target, await self.formats(target), paused=paused,
                         incoming=incoming)

    async def quit(self) -> None:
        """Make QEMU exit now, through the operation's session if one is open."""
        if self.running:
            await qemu.quit(self.paths, self._monitor)
        await self.close_monitor()
        self.forget_images()

    # -- its disks ---------------------------------------------------------------

    async def image_info(self, disk: Disk) -> dict[str, Any]:
        """``qemu-img info`` of the disk's image, read once per operation (its
        format and size do not change; its snapshot table does, see ``forget_images``)."""
        info = self._images.get(disk.file)
        if info is None:
            info = self._images[disk.file] = await images.stable_info(disk.file)
            self._formats[disk.file] = str(info["format"])
        return info

    async def block_nodes(self) -> dict[str, dict[str, Any]]:
        """The running QEMU's block nodes by name, asked once per operation: the
        formats and snapshot tables of the images it has open, without a
        ``qemu-img`` process per disk."""
        if self._nodes is None:
            nodes = await (await self.monitor()).execute("query-named-block-nodes",
                                                         {"flat": True})
            self._nodes = {n["node-name"]: n for n in nodes}
            for disk in self.definition.disks:
                node = self._nodes.get(disk.dev, {})
                if node.get("file") == str(disk.file) and "drv" in node:
                    self._formats[disk.file] = str(node["drv"])
        return self._nodes

    async def keep_tables(self) -> None:
        """After this operation made or deleted a snapshot of the running domain, keep
        the disks' tables as QEMU now has them (``tables.TableCopy``): the next listing,
        by this process or another, needs no ``qemu-img``."""
        if not self._tables_changed or not self.running:
            return
        copy = TableCopy(self.paths, self.definition)
        # Keys before the query: a change made after it does not match them.
        wall, keys = time.time_ns(), copy.keys()
        nodes = await self.block_nodes()
        infos = []
        for disk in self.definition.disks:
            node = nodes.get(disk.dev, {})
            if node.get("file") != str(disk.file) or "image" not in node:
                return
            infos.append((disk.dev, dict(node["image"])))
        await trio.to_thread.run_sync(copy.save, keys, wall, infos)

    def forget_images(self) -> None:
        """The snapshot tables read are stale: a snapshot was made or removed, or QEMU
        started or quit."""
        self._images.clear()
        self._nodes = None

    async def formats(self, definition: DomainDef | None = None) -> dict[str, str]:
        """Each disk's image format, by dev."""
        disks = (definition or self.definition).disks
        if self.running and any(disk.file not in self._formats for disk in disks):
            await self.block_nodes()
        result = {}
        for disk in disks:
            if disk.file not in self._formats:
                await self.image_info(disk)
            result[disk.dev] = self._formats[disk.file]
        return result

    async def require_qcow2(self) -> None:
        """:raise NotSupported: when a disk cannot hold internal snapshots."""
        for dev, fmt in (await self.formats()).items():
            if fmt != "qcow2":
                raise NotSupported(f"disk {dev} of {self.name!r} is {fmt}, not qcow2: "
                                   "it cannot hold internal snapshots")

    async def disk_snapshots(self, definition: DomainDef | None = None) -> list[DiskSnapshot]:
        """Every disk's internal snapshots, in disk order then table order: from QEMU
        when it runs (it has the images open), else from the images; read once
        until ``forget_images``."""
        disks = (definition or self.definition).disks
        result = []
        if not self.running:
            for disk in disks:
                info = await self.image_info(disk)
                result += [DiskSnapshot.from_qemu(disk.dev, s) for s in info.get("snapshots", [])]
            return result
        nodes = await self.block_nodes()
        for disk in disks:
            image = nodes.get(disk.dev, {}).get("image", {})
            result += [DiskSnapshot.from_qemu(disk.dev, s) for s in image.get("snapshots", [])]
        return result

    async def check_tag_free(self, tag: str) -> None:
        """:raise AlreadyExists: when a disk already has a snapshot ``tag``."""
        taken = [s.dev for s in await self.disk_snapshots() if s.tag == tag]
        if taken:
            raise AlreadyExists(f"disk snapshot {tag!r} already exists on {', '.join(taken)}")

    def viewed(self, tag: str) -> str:
        """The dev of a disk whose snapshot ``tag`` is open as a disk view, by any
        process ("" when none): deleting it then would make the view read freed
        clusters."""
        return next((d.dev for d in self.definition.disks
                     if exported(self.dirs.run, d.file, tag)), "")

    def refuse_viewed(self, tag: str) -> None:
        """:raise Busy: when snapshot ``tag`` is open as a disk view."""
        dev = self.viewed(tag)
        if dev:
            raise Busy(f"snapshot {tag!r} of disk {dev} is open as a disk view; close it first")

    async def snapshot_disks(self, tag: str) -> None:
        """One internal snapshot ``tag`` of every disk at one instant, all or none: a
        QMP transaction when QEMU runs (call it with the vCPUs stopped for a VM
        snapshot), ``qemu-img snapshot -c`` on each closed image otherwise."""
        self.forget_images()
        self._tables_changed = True
        if self.running:
            actions = [{"type": "blockdev-snapshot-internal-sync",
                        "data": {"device": d.dev, "name": tag}} for d in self.definition.disks]
            await (await self.monitor()).execute("transaction", {"actions": actions})
            return
        done: list[Path] = []
        try:
            for disk in self.definition.disks:
                await images.snapshot_create(disk.file, tag)
                done.append(disk.file)
        except SnapfsError:
            with trio.CancelScope(shield=True):
                for path in done:
                    await images.snapshot_delete(path, tag)
            raise

    async def delete_disk_tag(self, tag: str) -> None:
        """Delete snapshot ``tag`` from every disk that has it (a dead process may
        have left it on some only)."""
        table = await self.disk_snapshots()
        self.forget_images()
        self._tables_changed = True
        for disk in self.definition.disks:
            snaps = [s for s in table if s.dev == disk.dev]
            if not any(s.tag == tag for s in snaps):
                continue
            if self.running:
                await (await self.monitor()).execute(
                    "blockdev-snapshot-delete-internal-sync", {"device": disk.dev, "name": tag})
            else:
                await images.snapshot_delete(disk.file, tag, snaps)

    async def stored_tag(self, name: str) -> str:
        """The disk tag of the stored snapshot ``name`` (``.undo``...), "" when there is
        none or its info file cannot be read."""
        try:
            if await trio.to_thread.run_sync(self.store.exists, name):
                return (await trio.to_thread.run_sync(self.store.read, name)).disk_tag
        except SnapfsError:
            pass
        return ""

    async def forget(self, name: str, tag: str) -> None:
        """Remove VM snapshot ``name``, whatever state it is in: its info file first,
        so it is gone at once, then its disk snapshots and files (a dead process's
        journal finishes the job)."""
        with trace.phase("remove the info file"):
            await trio.to_thread.run_sync(self.store.info_path(name).unlink, True)
        with trace.phase("delete the disk snapshots"):
            await self.delete_disk_tag(tag)
        with trace.phase("remove the save image and config"):
            discarded = await trio.to_thread.run_sync(self.store.discard_save, name)
            if discarded is not None:
                self.discarded.append(discarded)
            await trio.to_thread.run_sync(self.store.remove, name)
