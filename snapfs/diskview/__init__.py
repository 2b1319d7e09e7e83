"""Point-in-time disk views: read a qcow2 internal snapshot as a raw image.

A *view* is a read-only, byte-addressable window onto one internal snapshot
(``tag``) of one qcow2 image.  The bytes are served by ``qemu-nbd`` and read
with libnbd (Debian's ``python3-libnbd``); nothing is copied.  This works
while the domain's QEMU keeps the image open and writes to its active layer
(the image is opened with ``force-share=on,read-only=on``: qemu-nbd has no
``-U``) and while the domain is shut off.

    views    DiskViews/DiskView: servers per snapshot, refcounts, read-ahead
    server   one qemu-nbd: spawn, readiness, stop
    pool     its NBD connections and the reads over them
    records  the files in <run dir>/nbd: exported(), reap_stale(), DiskViewError
"""

from .pool import DEFAULT_HANDLES
from .records import DiskViewError, exported, reap_stale
from .views import DEFAULT_IDLE, DiskView, DiskViews

__all__ = [
    "DEFAULT_HANDLES",
    "DEFAULT_IDLE",
    "DiskView",
    "DiskViewError",
    "DiskViews",
    "exported",
    "reap_stale",
]
