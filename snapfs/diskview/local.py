"""Views read in-process from the snapshot's own qcow2 tables (``snapfs.qcow2``).

A :class:`Local` is one snapshot opened by :class:`~.views.DiskViews`, shared
by the :class:`LocalView` objects open on it. It keeps a record in the run
dir exactly as a qemu-nbd server does (with no server pid), written before
the snapshot is looked up and kept while a view is open, so :func:`exported`
refuses a delete of the snapshot meanwhile: its clusters then stay where its
tables say.

Reads of pages already in the page cache are answered on the event loop
(``RWF_NOWAIT``: a thread hop costs more than the copy); the others go to a
worker thread, so a listing never waits behind a read from the disk.

:func:`usage` and :func:`changes` answer ``stat`` and ``.changes`` without a
view, from a small cache keyed by what the snapshot is.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from .. import qcow2
from ..errors import NotFound, SnapfsError
from .records import DiskViewError, Recorded, store_record

__all__ = ["Local", "LocalView", "changes", "usage"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_nowait = True      # False once the file system turned RWF_NOWAIT down
CACHED_ANSWERS = 4096
SETTLED_NS = 2_000_000_000


def _identity(entry: qcow2.SnapshotEntry) -> dict[str, Any]:
    return {"id": entry.id, "name": entry.name, "date-sec": entry.date_sec,
            "date-nsec": entry.date_nsec, "vm-clock-nsec": entry.vm_clock_nsec}


def open_snapshot(image: Path, tag: str) -> tuple[qcow2.Layer, qcow2.SnapshotEntry]:
    """Snapshot ``tag`` of ``image``, its tables checked through (blocking).

    :raise qcow2.Unsupported: when the reader cannot serve it. :raise NotFound:
    """
    img = qcow2.Image(image)
    try:
        entry = img.find(tag)
        layer = img.layer(entry)
        layer.allocated()   # reads every L2 table: compressed clusters are found now
    except BaseException:
        img.close()
        raise
    return layer, entry


class Local(Recorded):
    """One snapshot read in-process; ``refs`` views are open on it."""

    def __init__(self, image: Path, st: os.stat_result, tag: str, *, nbd_dir: Path,
                 owner_start: int | None) -> None:
        self.image = image
        self.dev, self.ino = st.st_dev, st.st_ino
        self.tag = tag
        self.owner_start = owner_start
        self.record = nbd_dir / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self.refs = 0
        self.layer: qcow2.Layer | None = None
        self.identity: dict[str, Any] | None = None
        self.lock = trio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<in-process view {self.tag!r} of {self.image}>"

    @property
    def size(self) -> int:
        return self.layer.size if self.layer is not None else 0

    def write_record(self) -> None:
        store_record(self.record, image=self.image, dev=self.dev, ino=self.ino, tag=self.tag,
                     socket=self.record.with_suffix(".sock"), server_pid=None,
                     server_start=None, owner_start=self.owner_start, refs=self.refs,
                     snapshot=self.identity)

    async def start(self) -> None:
        """Record first (deletes are refused from then on), then read the tables.

        :raise qcow2.Unsupported: (the record is gone again) :raise DiskViewError:
        """
        self.write_record()
        try:
            self.layer, entry = await trio.to_thread.run_sync(open_snapshot, self.image,
                                                              self.tag)
        except BaseException as err:
            self.record.unlink(missing_ok=True)
            self.closed = True
            if isinstance(err, NotFound):
                raise DiskViewError(str(err), _errno.ENOENT) from None
            if isinstance(err, qcow2.Qcow2Error) and not isinstance(err, qcow2.Unsupported):
                raise DiskViewError(f"cannot read snapshot {self.tag!r} of {self.image}: "
                                    f"{err}") from None
            raise
        self.identity = _identity(entry)
        self.try_write_record()

    async def stop(self) -> None:
        self.closed = True
        layer, self.layer = self.layer, None
        if layer is not None:
            await trio.to_thread.run_sync(layer.close)
        self.record.unlink(missing_ok=True)

    async def read(self, offset: int, size: int) -> bytes | bytearray:
        global _nowait
        layer = self.layer
        if layer is None:
            raise DiskViewError(f"view of {self.tag!r} of {self.image} is closed", _errno.EBADF)
        try:
            if _nowait:
                try:
                    return layer.read(offset, size, nowait=True)
                except BlockingIOError:
                    pass
                except OSError as err:
                    if err.errno != _errno.EOPNOTSUPP:
                        raise
                    _nowait = False
            return await trio.to_thread.run_sync(layer.read, offset, size)
        except (OSError, qcow2.Qcow2Error) as err:
            raise DiskViewError(f"reading snapshot {self.tag!r} of {self.image} at {offset}: "
                                f"{err}") from None


class LocalView:
    """An open, read-only raw view of one disk snapshot, read in-process."""

    __slots__ = ("_closed", "_local", "_release")

    def __init__(self, local: Local, release: Callable[[LocalView], Any]) -> None:
        self._local = local
        self._release = release
        self._closed = False

    @property
    def image(self) -> Path:
        return self._local.image

    @property
    def tag(self) -> str:
        return self._local.tag

    @property
    def size(self) -> int:
        """Virtual size of the disk at the snapshot, in bytes."""
        return self._local.size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def local(self) -> Local:
        return self._local

    async def read(self, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short at the end, empty past it."""
        if self._closed:
            raise DiskViewError(f"view of {self.tag!r} of {self.image} is closed", _errno.EBADF)
        if offset < 0 or size < 0:
            raise DiskViewError(f"bad read: offset {offset}, size {size}", _errno.EINVAL)
        return await self._local.read(offset, size)

    async def seek(self, offset: int, whence: int) -> int:
        """``lseek`` with SEEK_DATA or SEEK_HOLE, from the snapshot's allocation (by
        cluster). :raise DiskViewError: ENXIO past the end or after the last data."""
        layer = self._local.layer
        if self._closed or layer is None:
            raise DiskViewError(f"view of {self.tag!r} of {self.image} is closed", _errno.EBADF)
        try:
            return await trio.to_thread.run_sync(layer.seek, offset, whence)
        except OSError as err:
            raise DiskViewError(str(err.strerror), err.errno or _errno.EIO) from None
        except qcow2.Qcow2Error as err:
            raise DiskViewError(f"reading snapshot {self.tag!r} of {self.image}: {err}") \
                from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._release(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<LocalView {self.tag!r} of {self.image}: {state}>"


class LocalViews:
    """The in-process views of one :class:`~snapfs.diskview.views.DiskViews`, one
    :class:`Local` per snapshot, refcounted by the views open on it; the last view
    closed stops it (reopening costs only its tables, nothing to keep warm)."""

    def __init__(self, nbd_dir: Path, owner_start: int | None) -> None:
        self.nbd_dir = nbd_dir
        self.owner_start = owner_start
        self._locals: dict[tuple[int, int, str], Local] = {}

    async def open(self, path: Path, st: os.stat_result, tag: str,
                   shut: Callable[[], bool]) -> LocalView | None:
        """A view read in-process; None when the reader cannot read the image.
        ``shut()`` says whether the owner was shut down meanwhile."""
        key = (st.st_dev, st.st_ino, tag)
        while True:
            local = self._locals.get(key)
            if local is None:
                local = Local(path, st, tag, nbd_dir=self.nbd_dir,
                              owner_start=self.owner_start)
                self._locals[key] = local
            async with local.lock:
                if local.closed:
                    continue
                local.refs += 1
                if local.layer is not None:
                    local.try_write_record()
                    return LocalView(local, self._close)
                try:
                    await local.start()
                except qcow2.Unsupported as err:
                    logger.info("snapshot %r of %s: %s; served by qemu-nbd", tag, path, err)
                    return None
                finally:
                    if local.closed and self._locals.get(key) is local:
                        del self._locals[key]
                if shut():
                    local.refs -= 1
                    await local.stop()
                    raise DiskViewError("disk views are shut down")
                return LocalView(local, self._close)

    async def _close(self, view: LocalView) -> None:
        local = view.local
        local.refs -= 1
        if local.refs > 0:
            local.try_write_record()
            return
        with trio.CancelScope(shield=True):
            async with local.lock:
                if local.refs == 0 and not local.closed:
                    await local.stop()
                    key = (local.dev, local.ino, local.tag)
                    if self._locals.get(key) is local:
                        del self._locals[key]

    def is_open(self, path: str, tag: str) -> bool:
        return any(v.refs > 0 and v.tag == tag and not v.closed and str(v.image) == path
                   for v in self._locals.values())

    async def stop_all(self) -> None:
        for local in list(self._locals.values()):
            await local.stop()
        self._locals.clear()

    def drop_records(self) -> None:
        """The run is ending without a stop: leave no record claiming a view."""
        for local in self._locals.values():
            local.record.unlink(missing_ok=True)


# -- answers without a view ----------------------------------------------------

_answers: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def _remember(key: tuple[Any, ...], compute: Callable[[], T]) -> T:
    if key in _answers:
        _answers.move_to_end(key)
        return _answers[key]  # type: ignore[no-any-return]
    value = compute()
    _answers[key] = value
    if len(_answers) > CACHED_ANSWERS:
        _answers.popitem(last=False)
    return value


def _unchanged(img: qcow2.Image, entries: list[qcow2.SnapshotEntry],
               compute: Callable[[], T]) -> T:
    """``compute`` over the tables of ``entries``, answered only if they all still
    exist afterwards. A snapshot deleted meanwhile had its clusters freed (and maybe
    reused): whatever was read of it, a figure or an error, is worthless, and the
    truth is that the snapshot is gone."""
    try:
        value = compute()
    except (SnapfsError, OSError, ValueError, IndexError):
        _require(img, entries)
        raise
    _require(img, entries)
    return value


def _require(img: qcow2.Image, entries: list[qcow2.SnapshotEntry]) -> None:
    present = {entry.key for entry in img.snapshots()}
    for entry in entries:
        if entry.key not in present:
            raise NotFound(f"snapshot {entry.name!r} of {img.path} was deleted while read")


def _usage(image: Path, tag: str) -> tuple[int, int]:
    img = qcow2.Image(image)
    try:
        entry = img.find(tag)
        st = os.fstat(img.fd)
        return _remember(("usage", st.st_dev, st.st_ino, entry.key), lambda: _unchanged(
            img, [entry], lambda: (entry.disk_size, img.layer(entry).allocated() // 512)))
    finally:
        img.close()


class _ParentGone(Exception):
    pass


def _changes(image: Path, tag: str,
             parent: str | None) -> tuple[str | None, list[tuple[int, int]]]:
    try:
        return _changes_against(image, tag, parent)
    except _ParentGone:     # deleted while compared: the snapshot has no parent now
        return _changes_against(image, tag, None)


def _changes_against(image: Path, tag: str,
                     parent: str | None) -> tuple[str | None, list[tuple[int, int]]]:
    img = qcow2.Image(image)
    try:
        entry = img.find(tag)
        base = None
        if parent is not None:
            try:
                base = img.find(parent)
            except NotFound:
                base = None
        st = os.fstat(img.fd)
        key = ("changes", st.st_dev, st.st_ino, entry.key, base.key if base else None)
        try:
            ranges = _remember(key, lambda: _unchanged(
                img, [entry] if base is None else [entry, base],
                lambda: qcow2.changed_ranges(
                    img.layer(entry), img.layer(base) if base is not None else None)))
        except NotFound:
            if base is None:
                raise
            _require(img, [entry])
            raise _ParentGone() from None
        return (parent if base is not None else None), ranges
    finally:
        img.close()


def _settled(image: Path) -> tuple[int, ...] | None:
    """What the image file is, when nothing wrote it for SETTLED_NS (every change of
    its snapshot table changes its mtime); None while it is being written."""
    try:
        st = os.stat(image)
    except OSError:
        return None
    if time.time_ns() - st.st_mtime_ns < SETTLED_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


async def usage(image: Path, tag: str) -> tuple[int, int] | None:
    """Snapshot ``tag``'s disk size and the 512-byte blocks of the clusters it
    references; None when the reader cannot read the image. :raise NotFound:"""
    # A listing stats every view: of an image at rest, they are answered here.
    settled = _settled(image)
    if settled is not None and ("usage", settled, tag) in _answers:
        return _remember(("usage", settled, tag), lambda: None)
    found: tuple[int, int] | None = None
    try:
        found = await trio.to_thread.run_sync(_usage, image, tag)
    except NotFound:
        raise
    except (SnapfsError, OSError) as err:
        logger.debug("usage of %r of %s: %s", tag, image, err)
    if settled is not None:     # refusals too: an image qemu-nbd serves is not read again
        _remember(("usage", settled, tag), lambda: found)
    return found


async def changes(image: Path, tag: str, parent: str | None) -> tuple[str | None,
                                                                       list[tuple[int, int]]]:
    """The byte ranges of snapshot ``tag`` that differ from snapshot ``parent`` (all
    it may hold but zeros when ``parent`` is None or gone), and the parent compared.

    :raise NotFound: :raise qcow2.Unsupported: when the reader cannot read the image.
    """
    settled = _settled(image)
    key = ("changes", settled, tag, parent)
    if settled is not None and key in _answers:
        return _remember(key, lambda: (None, []))
    found = await trio.to_thread.run_sync(_changes, image, tag, parent)
    if settled is not None:
        _remember(key, lambda: found)
    return found
