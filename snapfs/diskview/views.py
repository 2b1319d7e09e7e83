"""The views a process has open: :class:`DiskViews` and the :class:`DiskView` it hands out.

Life cycle
    A view is read in-process from the snapshot's qcow2 tables
    (:class:`~snapfs.diskview.local.LocalViews`) unless the reader refuses the
    image; then :class:`DiskViews` keeps one ``qemu-nbd`` server per (image, tag)
    in this process, reference counted by the views open on it.  When the last
    view of a server is closed the server stays up for ``idle`` seconds (a tool
    that opens the same file again reuses it), then it is stopped and its socket
    and record are removed.  A :class:`DiskViews` belongs to one ``trio.run``;
    if that run ends without :meth:`DiskViews.aclose`, its servers are killed as
    the run shuts down.

Read-ahead
    A view read sequentially in small pieces (FUSE asks for 128 KiB) reads
    ahead in windows growing to 4 MiB.
"""

import errno as _errno
import json
import logging
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trio

from ..config import nbd_dir
from ..errors import QemuError
from ..images import run_tool
from ..procfs import proc_info
from .local import LocalView, LocalViews
from .pool import DEFAULT_HANDLES, nbd
from .records import STOP_TIMEOUT, DiskViewError, reap_stale
from .server import Server, classify, image_opts

__all__ = ["DEFAULT_IDLE", "DiskView", "DiskViews", "View"]

logger = logging.getLogger(__name__)

DEFAULT_IDLE = 2.0
"""Seconds an unused server is kept for a quick reopen."""
DEFAULT_READAHEAD = 4 << 20
"""Largest read-ahead window of a view read sequentially in small pieces."""
READAHEAD_MIN = 512 << 10


class DiskView:
    """An open, read-only raw view of one disk snapshot.  Close it with
    :meth:`DiskViews.close` (or :meth:`aclose` / ``async with``)."""

    __slots__ = ("_buf", "_buf_off", "_closed", "_fill", "_next", "_ra", "_server", "_views")

    def __init__(self, views: "DiskViews", server: Server) -> None:
        self._views = views
        self._server = server
        self._closed = False
        # Sequential small reads are served from one larger NBD read kept in
        # _buf.  The snapshot never changes, so the buffer never goes stale.
        self._next = 0  # where a sequential reader reads next
        self._ra = 0  # current read-ahead window (grows up to views.readahead)
        self._buf = b""
        self._buf_off = 0
        self._fill = trio.Lock()

    @property
    def image(self) -> Path:
        return self._server.image

    @property
    def tag(self) -> str:
        return self._server.tag

    @property
    def size(self) -> int:
        """Virtual size of the disk at the snapshot, in bytes."""
        return self._server.pool.size

    @property
    def closed(self) -> bool:
        return self._closed

    def _cached(self, offset: int, end: int) -> bytes | None:
        lo = offset - self._buf_off
        if lo >= 0 and end - self._buf_off <= len(self._buf):
            return self._buf[lo : end - self._buf_off]
        return None

    async def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short at the end, empty past it."""
        if self._closed:
            raise DiskViewError(
                f"view of {self.tag!r} of {self.image} is closed", _errno.EBADF
            )
        if offset < 0 or size < 0:
            raise DiskViewError(f"bad read: offset {offset}, size {size}", _errno.EINVAL)
        pool = self._server.pool
        end = min(offset + size, pool.size)
        if offset >= end:
            return b""
        hit = self._cached(offset, end)
        if hit is not None:
            self._next = end
            return hit
        limit = self._views.readahead
        sequential = offset == self._next
        self._next = end  # before awaiting: the next request in a stream queues below
        if not sequential or end - offset >= limit:
            self._ra = 0
            return await pool.read(offset, end - offset)
        async with self._fill:
            hit = self._cached(offset, end)  # filled while we waited
            if hit is not None:
                return hit
            self._ra = min(limit, max(self._ra * 2, READAHEAD_MIN, 2 * (end - offset)))
            data = await pool.read(offset, self._ra)
            self._buf, self._buf_off = data, offset
            return data[: end - offset]

    async def aclose(self) -> None:
        await self._views.close(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<DiskView {self.tag!r} of {self.image}: {state}>"


View = DiskView | LocalView
"""An open disk view: read in-process, or through qemu-nbd."""


class DiskViews:
    """The disk views of this process, refcounted per snapshot: read in-process
    from the snapshot's qcow2 tables, or through a qemu-nbd server for an image
    the in-process reader cannot read (``local=False``: always qemu-nbd).

    Use from a Trio task: ``views = DiskViews(run_dir)`` ... ``await
    views.aclose()`` (or ``async with DiskViews(run_dir) as views``).
    Construction creates ``<run_dir>/nbd`` (0700) and runs :func:`reap_stale`.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        idle: float = DEFAULT_IDLE,
        max_handles: int = DEFAULT_HANDLES,
        readahead: int = DEFAULT_READAHEAD,
        qemu_nbd: str = "qemu-nbd",
        qemu_img: str = "qemu-img",
        local: bool = True,
    ) -> None:
        if max_handles < 1:
            raise ValueError("max_handles must be at least 1")
        self.run_dir = Path(run_dir)
        self.nbd_dir = nbd_dir(run_dir)
        self.idle = idle
        self.max_handles = max_handles
        self.readahead = readahead
        self.qemu_nbd = qemu_nbd
        self.qemu_img = qemu_img
        self.local = local
        info = proc_info(os.getpid())
        self.owner_start = info.start if info else None
        self.nbd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.nbd_dir, 0o700)
        reap_stale(self.run_dir)
        self._servers: dict[tuple[int, int, str], Server] = {}
        self._locals = LocalViews(self.nbd_dir, self.owner_start)
        self._closed = False
        self._janitor: trio.CancelScope | None = None
        self._wakeup = trio.Event()

    # -- public API ------------------------------------------------------------

    async def open(self, image: Path, tag: str) -> View:
        """Open a view of snapshot ``tag`` of qcow2 ``image``.

        Raises :class:`DiskViewError` with errno ENOENT when the image or the
        snapshot does not exist, EOPNOTSUPP when the image is not qcow2, EIO
        for other failures.
        """
        if self._closed:
            raise DiskViewError("disk views are shut down")
        if nbd is None:
            raise DiskViewError("python3-libnbd is not installed (import nbd failed)")
        path = Path(os.path.abspath(image))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DiskViewError(f"no image {path}", _errno.ENOENT) from None
        except OSError as e:
            raise DiskViewError(f"cannot stat {path}: {e}", e.errno or _errno.EIO) from e
        key = (st.st_dev, st.st_ino, tag)
        if self.local:
            view = await self._locals.open(path, st, tag, lambda: self._closed)
            if view is not None:
                return view
        self._ensure_janitor()
        while True:
            srv = self._servers.get(key)
            if srv is None:
                srv = Server(
                    path, st, tag,
                    nbd_dir=self.nbd_dir, qemu_nbd=self.qemu_nbd,
                    max_handles=self.max_handles, owner_start=self.owner_start,
                    lookup=self.lookup,
                )
                self._servers[key] = srv
            async with srv.lock:
                if srv.dead:  # stopped while we waited for the lock
                    continue
                if srv.running and (
                    srv.pool.broken or srv.proc is None or srv.proc.poll() is not None
                ):
                    logger.warning(
                        "qemu-nbd for %r of %s failed (exit status %s): %s; starting a new one",
                        tag, path, srv.proc.returncode if srv.proc else None,
                        srv.stderr_text() or "no message",
                    )
                    with trio.CancelScope(shield=True):
                        await srv.teardown()
                    self._forget(srv)
                    continue
                srv.refs += 1
                srv.idle_deadline = None
                ok = False
                try:
                    if not srv.running:
                        await srv.start()
                    elif srv.refs == 1:  # idle until now: was the snapshot changed?
                        if not await self._still_valid(srv):
                            continue  # stopped; start a fresh server
                    else:
                        srv.write_record()
                    if self._closed:  # aclose() ran meanwhile; it stops srv next
                        raise DiskViewError("disk views are shut down")
                    ok = True
                finally:
                    if not ok:
                        srv.refs -= 1
                        if srv.dead or not srv.running:
                            self._forget(srv)
                        elif srv.refs == 0:
                            self._park(srv)
                return DiskView(self, srv)

    async def close(self, view: View) -> None:
        """Release ``view``; the server stops ``idle`` seconds after its last view."""
        if isinstance(view, LocalView):
            await view.aclose()
            return
        if view._closed:
            return
        view._closed = True
        view._buf = b""
        srv = view._server
        if srv.dead:
            return
        srv.refs -= 1
        if srv.refs > 0:
            srv.try_write_record()
        elif self.idle <= 0:
            with trio.CancelScope(shield=True):  # a cancelled caller still stops it
                async with srv.lock:
                    if srv.refs == 0 and not srv.dead:
                        await srv.teardown()
                        self._forget(srv)
        else:
            self._park(srv)

    async def aclose(self) -> None:
        """Stop every server (open views become unreadable).  Idempotent."""
        if self._closed and not self._servers:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._locals.stop_all()
            with trio.move_on_after(STOP_TIMEOUT * 3 + 5) as scope:
                for srv in list(self._servers.values()):
                    async with srv.lock:
                        if not srv.dead:
                            await srv.teardown()
                        self._forget(srv)
            if scope.cancelled_caught:  # pragma: no cover - a start hung
                self._kill_all_now()
        if self._janitor is not None:
            self._janitor.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def is_open(self, image: Path, tag: str) -> bool:
        """True while this process has a view open on that snapshot."""
        path = os.path.abspath(image)
        if self._locals.is_open(path, tag):
            return True
        return any(
            s.refs > 0 and s.tag == tag and not s.dead and str(s.image) == path
            for s in self._servers.values()
        )

    def servers(self) -> list[dict[str, Any]]:
        """Running servers, for status output and tests."""
        return [
            {
                "image": str(s.image),
                "tag": s.tag,
                "pid": s.proc.pid if s.proc else None,
                "refs": s.refs,
                "socket": str(s.socket),
            }
            for s in self._servers.values()
            if s.running
        ]

    # -- snapshot lookup -------------------------------------------------------

    async def lookup(self, image: Path, tag: str) -> dict[str, Any] | None:
        """The snapshot entry named ``tag`` (first one, as qemu-nbd picks), or None."""
        # `qemu-img snapshot -l` has no --output=json in QEMU 7.2; `info` has.
        argv = [self.qemu_img, "info", "-U", "--output=json", "--image-opts", image_opts(image)]
        try:
            out = await run_tool(argv, f"cannot read snapshots of {image}")
        except QemuError as e:
            raise DiskViewError(str(e), classify(str(e))) from e
        except OSError as e:
            raise DiskViewError(f"cannot run {self.qemu_img}: {e}") from e
        try:
            snaps = json.loads(out).get("snapshots") or []
        except ValueError as e:
            raise DiskViewError(f"bad qemu-img info output for {image}: {e}") from e
        for s in snaps:
            if s.get("name") == tag:
                keys = ("id", "name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")
                return {k: s.get(k) for k in keys}
        return None

    async def _still_valid(self, srv: Server) -> bool:
        """Before reusing an idle server, check its snapshot is still the same one.

        Stops the server and returns False if the snapshot was deleted or
        re-created meanwhile (raising ENOENT when it is gone).
        """
        srv.write_record()  # refs is 1 again: deletes are refused from here on
        ident = await self.lookup(srv.image, srv.tag)
        if ident == srv.identity and srv.proc is not None and srv.proc.poll() is None:
            logger.debug("reusing %r", srv)
            return True
        logger.info(
            "snapshot %r of %s changed while its server idled; stopping %r",
            srv.tag, srv.image, srv,
        )
        with trio.CancelScope(shield=True):
            await srv.teardown()
        self._forget(srv)
        if ident is None:
            raise DiskViewError(f"no snapshot {srv.tag!r} on {srv.image}", _errno.ENOENT)
        return False

    # -- idle servers ----------------------------------------------------------

    def _forget(self, srv: Server) -> None:
        srv.pool.close()  # marks it dead for views and readers still holding it
        key = (srv.dev, srv.ino, srv.tag)
        if self._servers.get(key) is srv:
            del self._servers[key]

    def _park(self, srv: Server) -> None:
        srv.idle_deadline = trio.current_time() + self.idle
        srv.try_write_record()
        self._wakeup.set()

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = trio.CancelScope()
            trio.lowlevel.spawn_system_task(
                self._run_janitor, self._janitor, name="diskview-janitor"
            )

    async def _run_janitor(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                while True:
                    try:
                        await self._janitor_pass()
                    except Exception:  # a system task must not crash
                        logger.exception("disk view janitor")
                        await trio.sleep(1)
        finally:
            if not self._closed:  # the Trio run is ending without aclose()
                self._kill_all_now()

    async def _janitor_pass(self) -> None:
        now = trio.current_time()
        for srv in list(self._servers.values()):
            if srv.refs == 0 and srv.idle_deadline is not None and srv.idle_deadline <= now:
                async with srv.lock:
                    if srv.refs == 0 and not srv.dead and srv.idle_deadline is not None:
                        logger.debug("stopping idle %r", srv)
                        with trio.CancelScope(shield=True):
                            await srv.teardown()
                        self._forget(srv)
        deadlines = [
            s.idle_deadline for s in self._servers.values()
            if s.refs == 0 and s.idle_deadline is not None
        ]
        with trio.move_on_at(min(deadlines, default=math.inf)):
            await self._wakeup.wait()
        self._wakeup = trio.Event()

    def _kill_all_now(self) -> None:
        self._closed = True
        self._locals.drop_records()
        for srv in list(self._servers.values()):
            try:
                srv.kill_now()
            except Exception:
                logger.exception("stopping %r", srv)
            self._forget(srv)
