"""The engine's queries about disk views: open one, its usage, its changes.

A part of ``engine.Engine`` kept in a module of its own (``Engine`` inherits
it); the bytes and tables are ``diskview``'s and ``qcow2``'s business.
"""

from contextlib import AbstractAsyncContextManager
from pathlib import Path

from . import diskview
from .config import DomainDef
from .diskview import DiskViews, View
from .errors import NotFound, StateError
from .operation import Operation, OpName

__all__ = ["DiskQueries"]


class DiskQueries:
    """Disk views of a domain's disks, by domain, tag and dev."""

    views: DiskViews | None

    def domain(self, name: str) -> DomainDef:
        raise NotImplementedError

    def _operation(self, name: str, what: OpName) -> AbstractAsyncContextManager[Operation]:
        raise NotImplementedError

    def disk_file(self, domain: str, dev: str) -> Path:
        """The image of disk ``dev``. :raise NotFound: when the domain has no such disk."""
        disk = next((d for d in self.domain(domain).disks if d.dev == dev), None)
        if disk is None:
            raise NotFound(f"domain {domain!r} has no disk {dev!r}")
        return disk.file

    async def open_disk_view(self, domain: str, tag: str, dev: str) -> View:
        """Taken under the domain's lock, so it cannot race a delete of the same snapshot."""
        if self.views is None:
            raise StateError("disk views are served by a mounted tree only")
        image = self.disk_file(domain, dev)
        async with self._operation(domain, OpName.DISK_VIEW):
            return await self.views.open(image, tag)

    async def disk_usage(self, domain: str, tag: str, dev: str) -> tuple[int, int] | None:
        """The disk's size at snapshot ``tag`` and the 512-byte blocks of the clusters
        that snapshot references; None when only qemu-nbd can read the image."""
        return await diskview.usage(self.disk_file(domain, dev), tag)

    async def disk_changes(self, domain: str, tag: str, dev: str, parent: str | None
                           ) -> tuple[str | None, list[tuple[int, int]]]:
        """The byte ranges that differ from snapshot ``parent`` (None: from an empty
        disk), and the parent compared (None when it is gone).
        :raise NotSupported: when only qemu-nbd can read the image."""
        return await diskview.changes(self.disk_file(domain, dev), tag, parent)
