"""Point-in-time disk views: read a qcow2 internal snapshot as a raw image.

A *view* is a read-only, byte-addressable window onto one internal snapshot
(``tag``) of one qcow2 image.  The bytes are read in-process from the
snapshot's own tables (``snapfs.qcow2``, ``local``); an image that reader
refuses (compressed clusters, encryption, an external data file...) is
served by ``qemu-nbd`` and read with libnbd (Debian's ``python3-libnbd``),
with one log line saying why.  Both work while the domain's QEMU keeps the
image open and writes to its active layer (qemu-nbd opens it with
``force-share=on,read-only=on``: it has no ``-U``) and while the domain is
shut off.

    views    DiskViews/DiskView: views per snapshot, refcounts, read-ahead
    local    the in-process reader's views; usage() and changes() for stat
    server   one qemu-nbd: spawn, readiness, stop
    pool     its NBD connections and the reads over them
    records  the files in <run dir>/nbd: exported(), reap_stale(), DiskViewError
"""

from .local import LocalView, changes, usage
from .pool import DEFAULT_HANDLES
from .records import DiskViewError, exported, reap_stale
from .views import DEFAULT_IDLE, DiskView, DiskViews, View

__all__ = [
    "DEFAULT_HANDLES",
    "DEFAULT_IDLE",
    "DiskView",
    "DiskViewError",
    "DiskViews",
    "LocalView",
    "View",
    "changes",
    "exported",
    "reap_stale",
    "usage",
]
