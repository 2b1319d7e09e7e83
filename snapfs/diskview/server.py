"""One qemu-nbd exporting one snapshot: spawn, readiness, stop, its record.

Readiness
    A server is ready when an NBD handshake completes, not when its socket
    accepts: qemu-nbd listens *before* it opens the image and loads the
    snapshot, so a connection can be accepted and then reset when loading
    fails.

Crashes
    qemu-nbd gets ``PR_SET_PDEATHSIG`` (SIGTERM, on which it removes its own
    socket).  The parent-death signal belongs to the *thread* that forked, so
    the server is spawned from the Trio thread itself and not through
    :func:`trio.lowlevel.open_process`, which forks from a worker thread that
    exits after 10 s idle and would take the server with it.
"""

import ctypes
import errno as _errno
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import trio

from ..images import qemu_opt
from ..procfs import proc_info
from .pool import Pool, close_handles, connect, nbd
from .records import STOP_TIMEOUT, DiskViewError, Recorded, store_record

__all__ = ["Lookup", "Server", "classify", "image_opts"]

logger = logging.getLogger(__name__)

Lookup = Callable[[Path, str], Awaitable[dict[str, Any] | None]]
"""Reads the identity of snapshot ``tag`` of an image; None when there is none."""

START_TIMEOUT = 15.0
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
_PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not glibc/Linux
    _prctl = None


def image_opts(image: Path) -> str:
    """``--image-opts`` that open a qcow2 read-only beside a QEMU writing it."""
    return (
        "driver=qcow2,file.driver=file,"
        f"file.filename={qemu_opt(str(image))},force-share=on,read-only=on"
    )


def classify(message: str) -> int:
    """The errno for a qemu-img or qemu-nbd error message."""
    if "Can't find snapshot" in message or "No such file or directory" in message:
        return _errno.ENOENT
    if "not in qcow2 format" in message:
        return _errno.EOPNOTSUPP
    if "Permission denied" in message:
        return _errno.EACCES
    return _errno.EIO


def _pdeathsig_preexec(parent: int) -> Callable[[], None] | None:
    if _prctl is None:
        return None
    prctl = _prctl

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Server(Recorded):
    """One qemu-nbd exporting one snapshot, its record, and its connection pool.

    ``refs`` counts the views open on it; :class:`~.views.DiskViews` changes it
    and decides when to start and stop, holding ``lock``.
    """

    def __init__(
        self,
        image: Path,
        st: os.stat_result,
        tag: str,
        *,
        nbd_dir: Path,
        qemu_nbd: str,
        max_handles: int,
        owner_start: int | None,
        lookup: Lookup,
    ) -> None:
        self.image = image
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.tag = tag
        self.nbd_dir = nbd_dir
        self.qemu_nbd = qemu_nbd
        self.owner_start = owner_start
        self.lookup = lookup
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.socket = nbd_dir / f"{name}.sock"
        self.record = nbd_dir / f"{name}.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_start: int | None = None
        self.pidfd: int | None = None
        self.stderr: IO[bytes] | None = None
        self.identity: dict[str, Any] | None = None
        self.refs = 0
        self.idle_deadline: float | None = None
        self.running = False
        self.lock = trio.Lock()
        self.pool = Pool(self.socket, image, tag, max_handles)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<qemu-nbd pid={pid} {self.tag!r} of {self.image}>"

    @property
    def dead(self) -> bool:
        """Stopped or being stopped: it takes no new views and no new reads."""
        return self.pool.closed

    # -- record ------------------------------------------------------------

    def write_record(self) -> None:
        store_record(
            self.record,
            image=self.image,
            dev=self.dev,
            ino=self.ino,
            tag=self.tag,
            socket=self.socket,
            server_pid=self.proc.pid if self.proc else None,
            server_start=self.server_start,
            owner_start=self.owner_start,
            refs=self.refs,
            snapshot=self.identity,
        )

    # -- start / stop --------------------------------------------------------

    async def start(self) -> None:
        t0 = time.monotonic()
        try:
            # Record first: from now on exported() is true and deletes are refused,
            # so the snapshot we look up below is the one qemu-nbd will load.
            self.write_record()
            self.identity = await self.lookup(self.image, self.tag)
            if self.identity is None:
                raise DiskViewError(
                    f"no snapshot {self.tag!r} on {self.image}", _errno.ENOENT
                )
            self.write_record()
            self.spawn()
            self.pool.adopt(await self.wait_ready())
            self.write_record()
            self.running = True
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.teardown()
            raise
        logger.info(
            "started qemu-nbd pid %d for %r of %s (%d bytes) in %.0f ms",
            self.proc.pid if self.proc else -1, self.tag, self.image, self.pool.size,
            (time.monotonic() - t0) * 1000,
        )

    def spawn(self) -> None:
        sock = str(self.socket)
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise DiskViewError(
                f"socket path {sock!r} is too long for a Unix socket: use a shorter run dir"
            )
        argv = [
            self.qemu_nbd,
            "--read-only",
            "--persistent",
            "--shared=0",
            f"--socket={sock}",
            f"--load-snapshot=snapshot.name={qemu_opt(self.tag)}",
            "--image-opts",
            image_opts(self.image),
        ]
        # Kept for the server's lifetime (its error messages); release_files closes it.
        self.stderr = tempfile.TemporaryFile(dir=self.nbd_dir)  # noqa: SIM115
        try:
            # Popen from the Trio thread (not a worker thread): PDEATHSIG is
            # tied to the forking thread.  fork+exec takes a few ms.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                close_fds=True,
                start_new_session=True,  # a terminal's ^C is for us, not for it
                # The child only calls prctl and getppid: no lock another thread might hold.
                preexec_fn=_pdeathsig_preexec(os.getpid()),  # noqa: PLW1509
            )
        except OSError as e:
            raise DiskViewError(f"cannot run {self.qemu_nbd}: {e}") from e
        self.pidfd = os.pidfd_open(self.proc.pid)
        info = proc_info(self.proc.pid)
        self.server_start = info.start if info else None
        self.write_record()

    def stderr_text(self) -> str:
        if self.stderr is None:
            return ""
        try:
            self.stderr.seek(0)
            return self.stderr.read(65536).decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def start_failure(self) -> DiskViewError:
        assert self.proc is not None
        text = self.stderr_text()
        lines = [ln.removeprefix("qemu-nbd: ") for ln in text.splitlines() if ln.strip()]
        why = "; ".join(lines) or f"exit status {self.proc.returncode}"
        return DiskViewError(
            f"cannot export snapshot {self.tag!r} of {self.image}: {why}", classify(text)
        )

    async def wait_ready(self) -> Any:
        """Wait until the server accepts connections; return the first one."""
        assert self.proc is not None and self.pidfd is not None
        deadline = trio.current_time() + START_TIMEOUT
        delay = 0.001
        sock = str(self.socket)
        while True:
            if self.proc.poll() is not None:
                raise self.start_failure()
            if os.path.exists(sock):
                # An accepted connection may still be reset when loading the
                # snapshot fails: whenever connecting fails, see if it exited.
                try:
                    return await trio.to_thread.run_sync(connect, sock)
                except nbd.Error as e:
                    with trio.move_on_after(0 if e.errno == "ECONNREFUSED" else 1):
                        await trio.lowlevel.wait_readable(self.pidfd)
                    if self.proc.poll() is not None:
                        raise self.start_failure() from e
                    if e.errno not in ("ECONNREFUSED", "ENOENT"):
                        raise DiskViewError(
                            f"cannot connect to qemu-nbd for {self.tag!r} of {self.image}: {e}"
                        ) from e
            if trio.current_time() >= deadline:
                raise DiskViewError(
                    f"qemu-nbd for {self.tag!r} of {self.image} did not start "
                    f"within {START_TIMEOUT:.0f} s: {self.stderr_text() or 'no message'}"
                )
            with trio.move_on_after(delay):
                await trio.lowlevel.wait_readable(self.pidfd)
            delay = min(delay * 2, 0.05)

    async def terminate(self) -> None:
        proc, pidfd = self.proc, self.pidfd
        if proc is None:
            return
        if proc.poll() is None:
            if self.running:
                proc.send_signal(signal.SIGTERM)  # qemu-nbd removes its socket on TERM
                if pidfd is not None:
                    with trio.move_on_after(STOP_TIMEOUT):
                        await trio.lowlevel.wait_readable(pidfd)
                if proc.poll() is None:
                    logger.warning("qemu-nbd pid %d ignored SIGTERM, killing it", proc.pid)
            # Not ready yet (a failed or cancelled start): qemu-nbd 7.2 can miss
            # a SIGTERM in its first milliseconds and hang, so kill it outright.
            if proc.poll() is None:
                proc.kill()
                if pidfd is not None:
                    with trio.move_on_after(STOP_TIMEOUT):
                        await trio.lowlevel.wait_readable(pidfd)
        if proc.poll() is None:  # pragma: no cover - unkillable
            logger.error("qemu-nbd pid %d did not exit", proc.pid)

    async def teardown(self) -> None:
        """Stop the server and remove its files; the caller holds ``lock``."""
        handles = self.pool.close()
        if handles:
            await trio.to_thread.run_sync(close_handles, handles)
        await self.terminate()
        self.running = False
        self.release_files()

    def release_files(self) -> None:
        if self.proc is not None and self.proc.returncode not in (None, 0, -signal.SIGTERM):
            logger.warning(
                "qemu-nbd pid %d for %r exited with %s: %s",
                self.proc.pid, self.tag, self.proc.returncode, self.stderr_text() or "no message",
            )
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        self.socket.unlink(missing_ok=True)
        if self.proc is None or self.proc.poll() is not None:
            self.record.unlink(missing_ok=True)  # kept while a server might still run

    def kill_now(self) -> None:
        """Synchronous last-resort cleanup (the Trio run is ending)."""
        self.running = False
        self.pool.close()  # dropped, not shut: the server goes down next anyway
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        self.release_files()
