"""Read a qcow2 internal snapshot in-process: its tables, its bytes, its allocation
and what changed against another snapshot.

A snapshot is an L1 table of its own; its L2 tables and data clusters are
shared by reference count, and QEMU copies on write any cluster whose
refcount is above 1: while the snapshot exists its clusters are never
written in place, so they can be read with ``pread`` while QEMU writes the
active layer. Zero and unallocated clusters cost no I/O; an unallocated one
reads the backing file's active layer (qcow2 or raw), as QEMU does. The size
is the disk's at snapshot time, as the snapshot records it.

Refused (:class:`Unsupported`, with the reason, for the caller to serve the
image another way): compressed clusters, encryption, an external data file,
extended L2 entries, an image marked corrupt, unknown incompatible features,
a backing file it cannot open.

Why not a library: on PyPI, ``libqcow-python`` (libyal's C libqcow, marked
experimental) reads the active layer only, not internal snapshots, and shows
no L2 entries (so neither allocation nor changes); ``dissect.qcow2`` is
AGPL-3.0 (snapfs is GPL-2.0-or-later) and not on the registry we install from.

Everything here blocks: call it from a worker thread, or with ``nowait=True``
from the event loop (``BlockingIOError`` instead of waiting for the disk).

    image    Image (header, snapshot table), Layer (one L1 table: bytes, allocation,
             holes), RawFile (a raw backing file)
    changes  changed_ranges, merge
"""

from .changes import changed_ranges, merge
from .image import Image, Layer, Qcow2Error, RawFile, SnapshotEntry, Unsupported

__all__ = ["Image", "Layer", "Qcow2Error", "RawFile", "SnapshotEntry", "Unsupported",
           "changed_ranges", "merge"]
