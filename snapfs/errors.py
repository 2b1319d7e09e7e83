"""The errors snapfs raises, each carrying the errno the tree must answer.

    SnapfsError                 base: a message for humans, an errno for FUSE
     +-- InvalidName            EINVAL        bad snapshot or domain name
     +-- NameTooLong            ENAMETOOLONG  name over 64 bytes
     +-- AlreadyExists          EEXIST        name taken, domain already running
     +-- NotFound               ENOENT        unknown domain or snapshot
     +-- Busy                   EBUSY         snapshot in use (open view)
     +-- NotSupported           EOPNOTSUPP    disk not qcow2
     +-- NoSpace                ENOSPC        state dir full while saving
     +-- ConfigError            EINVAL        malformed domain definition
     +-- StateError             EINVAL        operation not valid in this state
     +-- QemuError              EIO           QEMU, QMP or qemu-img failed

The CLI prints ``str(err)``; the tree answers ``err.errno`` and records the
message as ``last_error``.
"""

import errno as _errno

__all__ = [
    "SnapfsError", "InvalidName", "NameTooLong", "AlreadyExists", "NotFound",
    "Busy", "NotSupported", "NoSpace", "ConfigError", "StateError", "QemuError",
]


class SnapfsError(Exception):
    """Base class; ``errno`` is what a FUSE handler answers."""

    errno: int = _errno.EIO


class InvalidName(SnapfsError):
    errno = _errno.EINVAL


class NameTooLong(SnapfsError):
    errno = _errno.ENAMETOOLONG


class AlreadyExists(SnapfsError):
    errno = _errno.EEXIST


class NotFound(SnapfsError):
    errno = _errno.ENOENT


class Busy(SnapfsError):
    errno = _errno.EBUSY


class NotSupported(SnapfsError):
    errno = _errno.EOPNOTSUPP


class NoSpace(SnapfsError):
    errno = _errno.ENOSPC


class ConfigError(SnapfsError):
    errno = _errno.EINVAL


class StateError(SnapfsError):
    errno = _errno.EINVAL


class QemuError(SnapfsError):
    errno = _errno.EIO
