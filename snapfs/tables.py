"""Disk snapshot tables: what a domain's qcow2 images hold, and their copy in the run dir.

A table is read with ``qemu-img info -U`` (a process per disk: 10-100 ms, more
on an image with a thousand snapshots). Every process that lists snapshots
needs it, and most find the images as the last one left them, so the last
table read is kept in ``<run dir>/<name>.disks`` with the stat key of each
image it was read from. A key changes whenever its image is written,
replaced or resized (a snapshot made or removed sets the mtime); the copy is
trusted under the rule every cache of snapfs follows (``catalog``): while the
keys hold, if they were SETTLED seconds old when the table was read, else
for FRESH seconds at most, since a coarse mtime can hide a change made in the
same tick. The CLI's listings answer from it without trio; the catalog reads
it before running ``qemu-img`` and writes it after.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import DomainDef, RunPaths
from .files import atomic_write, make_dirs, read_text_nofollow
from .store import DAMAGED, VmSnapshot

__all__ = ["DiskSnapshot", "DiskTable", "TableCopy", "table_of", "check_tags", "stat_key",
           "settled", "FRESH", "SETTLED"]

logger = logging.getLogger(__name__)

FRESH = 0.5
SETTLED = 1.0

StatKey = tuple[int, int, int] | None
# One disk's ``qemu-img info``, by dev, in the definition's disk order.
Infos = list[tuple[str, dict[str, Any]]]


def stat_key(path: Path | str) -> StatKey:
    """What changes when a file is written, replaced or resized; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def settled(mtimes: list[int], wall_ns: int) -> bool:
    """Whether every mtime was SETTLED seconds old at ``wall_ns``."""
    return all(wall_ns - m > SETTLED * 1e9 for m in mtimes)


@dataclass(frozen=True)
class DiskSnapshot:
    """One internal snapshot of one disk, as qcow2 records it (xl's libxl_snapshot)."""

    dev: str
    id: str
    tag: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_sec: int
    vm_clock_nsec: int

    @classmethod
    def from_qemu(cls, dev: str, info: dict[str, Any]) -> "DiskSnapshot":
        """From a ``SnapshotInfo`` of QMP or ``qemu-img info --output=json``."""
        return cls(dev=dev, id=str(info["id"]), tag=info["name"],
                   vm_state_size=int(info.get("vm-state-size", 0)),
                   date_sec=int(info["date-sec"]), date_nsec=int(info["date-nsec"]),
                   vm_clock_sec=int(info["vm-clock-sec"]), vm_clock_nsec=int(info["vm-clock-nsec"]))


@dataclass(frozen=True)
class DiskTable:
    """What ``qemu-img info -U`` says about a domain's disks, read together."""

    tags: dict[str, list[DiskSnapshot]]     # tag -> its snapshot on each disk, in disk order
    sizes: dict[str, tuple[int, int]]       # dev -> (virtual size, bytes the image file takes)
    # every snapshot, in disk order then each image's table order (disk-snapshot-list)
    listed: tuple[DiskSnapshot, ...] = field(default=())


def table_of(infos: Infos) -> DiskTable:
    listed = tuple(DiskSnapshot.from_qemu(dev, raw) for dev, info in infos
                   for raw in info.get("snapshots", []))
    table = DiskTable({}, {}, listed)
    for dev, info in infos:
        # A snapshot is exported with the disk's size now: a disk resized since is
        # cut, or reads zeros past the end.
        table.sizes[dev] = (int(info["virtual-size"]), int(info.get("actual-size", 0)))
    for snap in listed:
        table.tags.setdefault(snap.tag, []).append(snap)
    return table


def check_tags(snap: VmSnapshot, table: DiskTable) -> VmSnapshot:
    """``snap``, marked damaged if its disk snapshot is missing on a disk of the domain."""
    if snap.damage:
        return snap
    have = {d.dev for d in table.tags.get(snap.disk_tag, [])}
    # Only the disks the domain has now can be looked at.
    missing = [dev for dev in snap.disks if dev in table.sizes and dev not in have]
    if not missing:
        return snap
    return replace(snap, state=DAMAGED, damage=f"its disk snapshot {snap.disk_tag!r} is "
                   f"missing on {', '.join(missing)}")


class TableCopy:
    """``<run dir>/<name>.disks``: the domain's table as last read, with its keys."""

    def __init__(self, paths: RunPaths, definition: DomainDef) -> None:
        self.path = paths.disks
        self.disks = [(d.dev, str(d.file)) for d in definition.disks]

    def keys(self) -> list[StatKey]:
        return [stat_key(file) for _, file in self.disks]

    def load(self) -> Infos | None:
        """The infos last read, if the images are still as they were then."""
        try:
            kept = json.loads(read_text_nofollow(self.path, limit=64 << 20))
            if [(d["dev"], d["file"]) for d in kept["disks"]] != self.disks:
                return None
            keys = [tuple(d["key"]) for d in kept["disks"]]
            fresh = time.time() - float(kept["read_at"]) < FRESH
            if keys != self.keys() or not (kept["settled"] or fresh):
                return None
            return [(d["dev"], d["info"]) for d in kept["disks"]]
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
            return None

    def save(self, keys: list[StatKey], wall_ns: int, infos: Infos) -> None:
        """Keep ``infos``, read from images whose keys were ``keys`` at ``wall_ns``."""
        if any(k is None for k in keys):
            return
        disks = [{"dev": dev, "file": file, "key": key, "info": info}
                 for (dev, file), key, (_, info) in zip(self.disks, keys, infos, strict=True)]
        data = {"read_at": wall_ns / 1e9, "disks": disks,
                "settled": settled([k[1] for k in keys if k is not None], wall_ns)}
        try:
            make_dirs(self.path.parent, 0o700)     # /run is empty after a reboot
            atomic_write(self.path, json.dumps(data), mode=0o600, durable=False)
        except OSError as err:
            logger.debug("cannot keep the disk table in %s: %s", self.path, err)
