"""Linux inotify for trio, through libc: what ``watch`` needs and nothing more.

ctypes on libc's ``inotify_init1``/``inotify_add_watch``/``inotify_rm_watch``
rather than a binding from PyPI: three calls and a fixed record format do not
justify a dependency, and the file descriptor must be waited on by trio
(``wait_readable``), which the asyncio-minded bindings do not offer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = ["CHANGED", "DIR_GONE", "IN_ISDIR", "IN_Q_OVERFLOW", "Event", "Inotify"]

IN_MODIFY = 0x0002
IN_ATTRIB = 0x0004
IN_CLOSE_WRITE = 0x0008
IN_MOVED_FROM = 0x0040
IN_MOVED_TO = 0x0080
IN_CREATE = 0x0100
IN_DELETE = 0x0200
IN_DELETE_SELF = 0x0400
IN_MOVE_SELF = 0x0800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x0100_0000
IN_ISDIR = 0x4000_0000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What a name in a watched directory can go through: made, written and closed,
# renamed in or out, removed. IN_MODIFY is left out: a save image QEMU is
# writing would raise one per write, and it is renamed into place when done.
CHANGED = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_ATTRIB
# The watched directory itself went away (removed, renamed, or its file system unmounted).
DIR_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED

_HEADER = struct.Struct("iIII")     # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@dataclass(frozen=True)
class Event:
    wd: int         # -1 with IN_Q_OVERFLOW: events were lost
    mask: int
    name: str       # the name in the watched directory; "" for the directory itself


class Inotify:
    """One inotify instance; ``events`` waits for the next batch."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def add(self, path: Path, mask: int) -> int:
        """Watch ``path``; returns its watch descriptor. :raise OSError: (ENOENT if absent)"""
        return _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), mask),
                      f"inotify_add_watch {path}")

    def remove(self, wd: int) -> None:
        # EINVAL: the kernel already dropped it (its directory was removed).
        _libc.inotify_rm_watch(self.fd, wd)

    async def events(self) -> list[Event]:
        """The events queued now, waiting for at least one."""
        while True:
            try:
                data = os.read(self.fd, 64 << 10)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
        events, offset = [], 0
        while offset < len(data):
            wd, mask, _, size = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            raw = data[offset:offset + size].split(b"\0", 1)[0]
            offset += size
            events.append(Event(wd, mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
