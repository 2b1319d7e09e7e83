"""What the tree asks of the engine, and nothing more.

``model.Tree`` reads the domains and their snapshots only through this
protocol and changes them only through its verbs. ``engine.Engine`` implements
it (and owns every cache behind it: a query is cheap to repeat); the model's
unit tests implement it with a fake in memory, with no QEMU and no qemu-img.
Every method raises ``SnapfsError`` subclasses (``NotFound`` for what is not
there), whose errno the tree answers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from ..images import DiskTable
from ..status import DomainStatus
from ..store import VmSnapshot

__all__ = ["Queries", "Readable"]


class Readable(Protocol):
    """An open file's bytes: a save image, a disk view."""

    async def read(self, offset: int, size: int) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


class Queries(Protocol):
    # -- domains -------------------------------------------------------------

    def domain_names(self) -> list[str]:
        """Every defined domain, sorted."""

    def domain_exists(self, domain: str) -> bool:
        """Whether ``domain`` is defined (a stat, no parsing)."""

    def domains_mtime_ns(self) -> int:
        """When a domain was last defined or removed (0 if unknown)."""

    def domain_mtime_ns(self, domain: str) -> int:
        """When the domain's definition last changed. :raise NotFound:"""

    async def status(self, domain: str) -> DomainStatus:
        """Run state, current snapshot, operation in progress, last error."""

    def current(self, domain: str) -> str:
        """The snapshot last created or applied ("" when none)."""

    def record_error(self, domain: str, message: str) -> None:
        """Keep ``message`` as the domain's ``last_error``."""

    def statfs(self) -> os.statvfs_result:
        """The state dir's file system: where save images take space."""

    # -- VM snapshots ----------------------------------------------------------

    async def snapshots(self, domain: str) -> Mapping[str, VmSnapshot]:
        """The domain's VM snapshots by name, oldest first (``.undo`` not among them)."""

    async def snapshot(self, domain: str, name: str) -> VmSnapshot:
        """One VM snapshot, ``.undo`` included. :raise NotFound:"""

    async def snapshot_config(self, domain: str, name: str) -> bytes:
        """The definition saved with the snapshot (``config.toml``). :raise NotFound:"""

    async def save_size(self, domain: str, name: str) -> tuple[int, int]:
        """The save image's size and 512-byte blocks. :raise NotFound: when it has none."""

    async def open_save(self, domain: str, name: str) -> Readable:
        """The save image's bytes. :raise NotFound:"""

    # -- disks ----------------------------------------------------------------

    async def disk_table(self, domain: str, fresh: bool = False) -> DiskTable:
        """Every internal snapshot of every disk of the domain, by tag, and the disks'
        sizes; ``fresh`` reads them again instead of from the cache."""

    async def open_disk_view(self, domain: str, tag: str, dev: str) -> Readable:
        """Disk ``dev`` at snapshot ``tag``, as a raw image.
        :raise StateError: when no mounted tree serves disk views."""

    async def disk_usage(self, domain: str, tag: str, dev: str) -> tuple[int, int] | None:
        """Disk ``dev``'s size at snapshot ``tag`` and the 512-byte blocks of the
        clusters that snapshot references; None when they cannot be read."""

    async def disk_changes(self, domain: str, tag: str, dev: str, parent: str | None
                           ) -> tuple[str | None, list[tuple[int, int]]]:
        """The (start, length) byte ranges of disk ``dev`` at snapshot ``tag`` that
        differ from snapshot ``parent`` (None: from an empty disk), sorted and merged,
        and the parent compared (None when it is gone).
        :raise NotSupported: when the image's tables cannot be read."""

    # -- verbs ------------------------------------------------------------------

    async def vm_snapshot_create(self, name: str, snapshot: str | None = None) -> VmSnapshot: ...

    async def vm_snapshot_delete(self, name: str, snapshot: str) -> None: ...

    async def vm_snapshot_apply(self, name: str, snapshot: str, paused: bool = False) -> None: ...

    async def disk_snapshot_create(self, name: str, tag: str | None = None) -> str: ...

    async def disk_snapshot_delete(self, name: str, id: str | None = None,
                                   tag: str | None = None) -> None: ...
