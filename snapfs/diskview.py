"""Point-in-time disk views: read a qcow2 internal snapshot as a raw image.

A *view* is a read-only, byte-addressable window onto one internal snapshot
(``tag``) of one qcow2 image.  The bytes are served by ``qemu-nbd`` and read
with libnbd (Debian's ``python3-libnbd``); nothing is copied.  This works
while the domain's QEMU keeps the image open and writes to its active layer
(the image is opened with ``force-share=on,read-only=on``: qemu-nbd has no
``-U``) and while the domain is shut off.

Life cycle
    :class:`DiskViews` keeps one server per (image, tag) in this process,
    reference counted by the views open on it.  The first :meth:`DiskViews.open`
    starts ``qemu-nbd``; when the last view is closed the server stays up for
    ``idle`` seconds (a tool that opens the same file again reuses it), then
    it is stopped and its socket and record are removed.  A server is ready
    when an NBD handshake completes, not when its socket accepts: qemu-nbd
    listens *before* it opens the image and loads the snapshot.  A
    :class:`DiskViews` belongs to one ``trio.run``; if that run ends without
    :meth:`DiskViews.aclose`, its servers are killed as the run shuts down.

Reads
    Each server has a pool of NBD connections (one per CPU, at most 4); the
    blocking libnbd ``pread`` runs in Trio worker threads.  A view read
    sequentially in small pieces (FUSE asks for 128 KiB) reads ahead in
    windows growing to 4 MiB; reads of 2 MiB and more are spread over the
    connections.  Reads are clamped at the end of the disk.

Files (``<run dir>/nbd``, mode 0700)
    ``<pid>-<token>.sock``  the server's Unix socket
    ``<pid>-<token>.json``  its record: image, tag, qemu-nbd pid, owner pid,
                            how many views are open, the snapshot's identity.

    The record is written *before* qemu-nbd starts and removed *after* it has
    exited, so a server never runs without a record.

Deleting an exported snapshot
    qcow2 does not stop anyone from deleting a snapshot that qemu-nbd exports
    (qemu-img and QMP both succeed: the lock bytes of a force-share reader do
    not conflict), and the server then silently serves freed, reused clusters.
    :func:`exported` lets any process (the CLI, the engine) refuse the delete
    with EBUSY while a view is open.  A server that is only idling does not
    count as exported; instead, before an idle server is reused, the snapshot
    table is read again and the server is restarted (or the open fails with
    ENOENT) if the snapshot was deleted or re-created meanwhile.

Crashes
    qemu-nbd gets ``PR_SET_PDEATHSIG`` (SIGTERM, on which it removes its own
    socket).  The parent-death signal belongs to the *thread* that forked, so
    the server is spawned from the Trio thread itself and not through
    :func:`trio.lowlevel.open_process`, which forks from a worker thread that
    exits after 10 s idle and would take the server with it.  Whatever a
    crash still leaves behind (records, sockets, servers whose owner is gone)
    is removed by :func:`reap_stale`, which :class:`DiskViews` runs when it is
    constructed.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import json
import logging
import math
import os
import secrets
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import trio

try:  # Debian's python3-libnbd; only needed to actually open views
    import nbd  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the host
    nbd = None

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HANDLES",
    "DEFAULT_IDLE",
    "DiskView",
    "DiskViewError",
    "DiskViews",
    "exported",
    "reap_stale",
]

NBD_SUBDIR = "nbd"
DEFAULT_IDLE = 2.0
"""Seconds an unused server is kept for a quick reopen."""
DEFAULT_HANDLES = max(1, min(4, len(os.sched_getaffinity(0))))
"""NBD connections per server: reads of one snapshot in flight at once.

Measured with 4 concurrent readers on a 2-CPU machine (page cache warm): one
connection 1.0 GB/s, two 1.4-1.6 GB/s, four 1.0-1.1 GB/s -- qemu-nbd, the
kernel and the Python reader threads share the CPUs, so more connections than
CPUs only add contention.  Hence: one per CPU, at most 4."""
MAX_REQUEST = 32 << 20
"""Largest single NBD read (qemu-nbd's limit); bigger reads are split."""
REQUEST_CHUNK = 4 << 20
"""NBD request size for big reads: larger buffers only cost page faults."""
SPLIT_MIN = 1 << 20
"""Reads of at least twice this go out in parallel over several connections."""
DEFAULT_READAHEAD = 4 << 20
"""Largest read-ahead window of a view read sequentially in small pieces."""
READAHEAD_MIN = 512 << 10
START_TIMEOUT = 15.0
STOP_TIMEOUT = 3.0
_RECORD_VERSION = 1
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
_PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not glibc/Linux
    _prctl = None


class DiskViewError(Exception):
    """A view could not be opened or read; ``errno`` says why (ENOENT, EIO, ...)."""

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


# ---------------------------------------------------------------------------
# small helpers: paths, option escaping, /proc


def _nbd_dir(run_dir: Path | str) -> Path:
    return Path(os.path.realpath(run_dir)) / NBD_SUBDIR


def _escape_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def _image_opts(image: Path) -> str:
    return (
        "driver=qcow2,file.driver=file,"
        f"file.filename={_escape_opt(str(image))},force-share=on,read-only=on"
    )


@dataclass(frozen=True)
class _ProcInfo:
    state: str
    ppid: int
    start: int  # clock ticks since boot; with the pid, identifies a process


def _proc_info(pid: int) -> _ProcInfo | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        rest = data[data.rindex(b")") + 2 :].split()
        return _ProcInfo(rest[0].decode(), int(rest[1]), int(rest[19]))
    except (ValueError, IndexError):
        return None


def _alive(pid: int | None, start: int | None) -> bool:
    """True when process ``pid`` runs and (if given) started at ``start``."""
    if not pid:
        return False
    info = _proc_info(pid)
    if info is None or info.state in ("Z", "X", "x"):
        return False
    return start is None or info.start == start


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def _socket_arg(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("--socket="):
            return arg[len("--socket=") :]
    return None


def _our_servers(d: Path) -> dict[int, str]:
    """qemu-nbd processes (any owner) whose socket lives in ``d``: pid -> socket."""
    found: dict[int, str] = {}
    prefix = str(d) + os.sep
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if not argv or not os.path.basename(argv[0]).startswith("qemu-nbd"):
            continue
        sock = _socket_arg(argv)
        if sock and sock.startswith(prefix) and os.sep not in sock[len(prefix) :]:
            found[int(entry)] = sock
    return found


def _wait_fd(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _terminate_foreign(pid: int, start: int | None, d: Path) -> bool:
    """Stop a qemu-nbd that is not (or no longer) our child. True if it was ours."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # The pidfd pins the process: check it is the server we mean, then signal it.
        info = _proc_info(pid)
        sock = _socket_arg(_cmdline(pid))
        if info is None or (start is not None and info.start != start):
            return False
        if sock is None or os.path.dirname(sock) != str(d):
            return False
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            if _wait_fd(pidfd, wait):
                return True
        logger.error("qemu-nbd pid %d did not die", pid)
        return True
    finally:
        os.close(pidfd)


def _unlink(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("unreadable view record %s: %s", path, e)
        return {}
    return rec if isinstance(rec, dict) else {}


def _records(d: Path) -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            rec = _read_record(d / name)
            if rec is not None:
                out.append((d / name, rec))
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (runtime state: no fsync needed on /run)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _record_in_use(rec: dict[str, Any]) -> bool:
    """A view is open on this record's server (or the server is starting)."""
    if not _alive(rec.get("owner_pid"), rec.get("owner_start")):
        return False
    if int(rec.get("refs", 0) or 0) <= 0:
        return False
    server = rec.get("server_pid")
    if server is None:  # starting: the owner is about to export the snapshot
        return True
    info = _proc_info(int(server))
    return (
        info is not None
        and info.state not in ("Z", "X", "x")
        and info.start == rec.get("server_start")
        and info.ppid == rec.get("owner_pid")
    )


def _same_image(rec: dict[str, Any], st: os.stat_result | None, image: str) -> bool:
    if st is not None and rec.get("dev") == st.st_dev and rec.get("ino") == st.st_ino:
        return True
    return rec.get("image") in (image, os.path.realpath(image))


# ---------------------------------------------------------------------------
# cross-process functions


def exported(run_dir: Path, image: Path, tag: str) -> bool:
    """True while some live process has a view open on snapshot ``tag`` of ``image``.

    Reads the records in ``<run_dir>/nbd``; a record counts when its owner
    process is alive, at least one view is open and its qemu-nbd is running
    (or still starting).  Servers that only idle after the last close do not
    count: their owner re-checks the snapshot before reusing them.  Use it to
    refuse deleting the snapshot (EBUSY).
    """
    d = _nbd_dir(run_dir)
    path = os.path.abspath(image)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    for _, rec in _records(d):
        if rec.get("tag") == tag and _same_image(rec, st, path) and _record_in_use(rec):
            return True
    return False


def reap_stale(run_dir: Path) -> int:
    """Stop servers and remove sockets/records left by dead owner processes.

    Returns how many servers or leftover files were cleaned.  Safe to run at
    any time from any process: servers whose owner is alive are left alone.
    """
    d = _nbd_dir(run_dir)
    if not d.is_dir():
        return 0
    cleaned = 0
    for path, rec in _records(d):
        owner_alive = _alive(rec.get("owner_pid"), rec.get("owner_start"))
        if owner_alive:
            continue
        server = rec.get("server_pid")
        if server:
            if _terminate_foreign(int(server), rec.get("server_start"), d):
                logger.info(
                    "stopped stale qemu-nbd pid %s (snapshot %r of %s, owner pid %s gone)",
                    server, rec.get("tag"), rec.get("image"), rec.get("owner_pid"),
                )
        sock = rec.get("socket")
        if isinstance(sock, str) and os.path.dirname(sock) == str(d):
            _unlink(sock)
        _unlink(path)
        cleaned += 1
    # Servers without a live owner record: owner died before/after writing it,
    # or was reparented (its owner process exited).  Decide on a fresh read of
    # the record: a live owner writes it before the server starts.
    for pid, sock in _our_servers(d).items():
        live = _read_record(Path(sock).with_suffix(".json"))
        if live and _alive(live.get("owner_pid"), live.get("owner_start")):
            info = _proc_info(pid)
            if info is None or info.ppid == live.get("owner_pid"):
                continue
        if _terminate_foreign(pid, None, d):
            logger.info("stopped orphaned qemu-nbd pid %d (%s)", pid, sock)
            cleaned += 1
    # Sockets whose record is gone, and abandoned temporary files.
    now = time.time()
    for name in os.listdir(d):
        p = d / name
        if name.endswith(".sock") and not p.with_suffix(".json").exists():
            _unlink(p)
            cleaned += 1
        elif name.startswith(".") and name.endswith(".tmp"):
            try:
                if now - p.stat().st_mtime > 60:
                    _unlink(p)
            except FileNotFoundError:
                pass
    return cleaned


# ---------------------------------------------------------------------------
# the per-process server table


def _pdeathsig_preexec(parent: int) -> Callable[[], None] | None:
    if _prctl is None:
        return None
    prctl = _prctl

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _connect_handle(sock: str) -> Any:
    h = nbd.NBD()
    h.set_handle_name("snapfs")
    h.set_pread_initialize(False)  # libnbd fills the buffer or fails
    h.connect_unix(sock)
    return h


def _close_handles(handles: list[Any]) -> None:
    for h in handles:
        try:
            h.shutdown()
        except Exception:  # noqa: BLE001 - connection already gone
            pass
    handles.clear()


def _classify(message: str) -> int:
    if "Can't find snapshot" in message or "No such file or directory" in message:
        return _errno.ENOENT
    if "not in qcow2 format" in message:
        return _errno.EOPNOTSUPP
    if "Permission denied" in message:
        return _errno.EACCES
    return _errno.EIO


class _Server:
    """One qemu-nbd exporting one snapshot, and a pool of NBD connections."""

    def __init__(
        self, views: DiskViews, image: Path, st: os.stat_result, tag: str
    ) -> None:
        self.views = views
        self.image = image
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.tag = tag
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.socket = views.nbd_dir / f"{name}.sock"
        self.record = views.nbd_dir / f"{name}.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_start: int | None = None
        self.pidfd: int | None = None
        self.stderr: IO[bytes] | None = None
        self.size = 0
        self.max_request = MAX_REQUEST
        self.identity: dict[str, Any] | None = None
        self.refs = 0
        self.idle_deadline: float | None = None
        self.running = False
        self.dead = False
        self.broken = False  # a connection to it died
        self.lock = trio.Lock()
        self.free: list[Any] = []
        self.slots = trio.Semaphore(views.max_handles)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<qemu-nbd pid={pid} {self.tag!r} of {self.image}>"

    # -- record ------------------------------------------------------------

    def write_record(self) -> None:
        _write_json(
            self.record,
            {
                "version": _RECORD_VERSION,
                "image": str(self.image),
                "dev": self.dev,
                "ino": self.ino,
                "tag": self.tag,
                "socket": str(self.socket),
                "server_pid": self.proc.pid if self.proc else None,
                "server_start": self.server_start,
                "owner_pid": os.getpid(),
                "owner_start": self.views.owner_start,
                "refs": self.refs,
                "snapshot": self.identity,
                "updated": time.time(),
            },
        )

    def try_write_record(self) -> None:
        try:
            self.write_record()
        except OSError as e:
            logger.error("cannot update view record %s: %s", self.record, e)

    # -- start / stop --------------------------------------------------------

    async def start(self) -> None:
        t0 = time.monotonic()
        try:
            # Record first: from now on exported() is true and deletes are refused,
            # so the snapshot we look up below is the one qemu-nbd will load.
            self.write_record()
            self.identity = await self.views.lookup(self.image, self.tag)
            if self.identity is None:
                raise DiskViewError(
                    f"no snapshot {self.tag!r} on {self.image}", _errno.ENOENT
                )
            self.write_record()
            self.spawn()
            h = await self.wait_ready()
            self.free.append(h)
            self.size = int(h.get_size())
            limit = int(h.get_block_size(nbd.SIZE_MAXIMUM) or 0)
            self.max_request = min(MAX_REQUEST, limit) if limit > 0 else MAX_REQUEST
            self.write_record()
            self.running = True
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.teardown()
            raise
        logger.info(
            "started qemu-nbd pid %d for %r of %s (%d bytes) in %.0f ms",
            self.proc.pid if self.proc else -1, self.tag, self.image, self.size,
            (time.monotonic() - t0) * 1000,
        )

    def spawn(self) -> None:
        sock = str(self.socket)
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise DiskViewError(
                f"socket path {sock!r} is too long for a Unix socket: use a shorter run dir"
            )
        argv = [
            self.views.qemu_nbd,
            "--read-only",
            "--persistent",
            "--shared=0",
            f"--socket={sock}",
            f"--load-snapshot=snapshot.name={_escape_opt(self.tag)}",
            "--image-opts",
            _image_opts(self.image),
        ]
        self.stderr = tempfile.TemporaryFile(dir=self.views.nbd_dir)
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
                preexec_fn=_pdeathsig_preexec(os.getpid()),
            )
        except OSError as e:
            raise DiskViewError(f"cannot run {self.views.qemu_nbd}: {e}") from e
        self.pidfd = os.pidfd_open(self.proc.pid)
        info = _proc_info(self.proc.pid)
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
            f"cannot export snapshot {self.tag!r} of {self.image}: {why}", _classify(text)
        )

    async def wait_ready(self) -> Any:
        """Wait until the server accepts connections; return the first handle."""
        assert self.proc is not None and self.pidfd is not None
        deadline = trio.current_time() + START_TIMEOUT
        delay = 0.001
        sock = str(self.socket)
        while True:
            if self.proc.poll() is not None:
                raise self.start_failure()
            if os.path.exists(sock):
                # qemu-nbd listens *before* it opens the image and loads the
                # snapshot: a connection can be accepted and then reset when
                # loading fails.  Whenever connecting fails, see if it exited.
                try:
                    return await trio.to_thread.run_sync(_connect_handle, sock)
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
        self.dead = True
        handles, self.free = self.free, []
        if handles:
            await trio.to_thread.run_sync(_close_handles, handles)
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
        _unlink(self.socket)
        if self.proc is None or self.proc.poll() is not None:
            _unlink(self.record)  # keep it while a server might still run

    def kill_now(self) -> None:
        """Synchronous last-resort cleanup (the Trio run is ending)."""
        self.running = False
        self.dead = True
        self.free.clear()
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

    # -- reads ---------------------------------------------------------------

    async def acquire(self) -> Any:
        await self.slots.acquire()
        try:
            if self.dead:
                raise DiskViewError(f"view of {self.tag!r} of {self.image} is closed")
            if self.free:
                return self.free.pop()
            return await trio.to_thread.run_sync(_connect_handle, str(self.socket))
        except BaseException as e:
            self.slots.release()
            if nbd is not None and isinstance(e, nbd.Error):
                raise DiskViewError(
                    f"cannot connect to qemu-nbd for {self.tag!r} of {self.image}: {e}"
                ) from e
            raise

    def release(self, h: Any, healthy: bool) -> None:
        if healthy and not self.dead:
            self.free.append(h)
        # else: dropping the last reference closes the connection
        self.slots.release()

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) clamped to the disk; big reads go out in
        parallel over several connections."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        n = end - offset
        ways = min(self.views.max_handles, n // SPLIT_MIN)
        if ways < 2:
            chunks = await self.read_chunks(offset, n)
        else:
            step = -(-n // ways)
            step += -step % 65536  # whole clusters per part
            starts = list(range(offset, end, step))
            results: list[list[bytearray]] = [[] for _ in starts]
            errors: list[Exception] = []

            async def part(i: int, pos: int) -> None:
                try:
                    results[i] = await self.read_chunks(pos, min(step, end - pos))
                except Exception as e:  # noqa: BLE001 - re-raised below, unwrapped
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for i, pos in enumerate(starts):
                    nursery.start_soon(part, i, pos)
            if errors:
                raise errors[0]
            chunks = [c for r in results for c in r]
        # one copy into the bytes we return
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    async def read_chunks(self, offset: int, n: int) -> list[bytearray]:
        """Read over one connection, in requests of at most REQUEST_CHUNK bytes."""
        h = await self.acquire()
        healthy = False
        try:
            chunks = []
            pos, end = offset, offset + n
            limit = min(self.max_request, REQUEST_CHUNK)
            while pos < end:
                k = min(limit, end - pos)
                chunks.append(await trio.to_thread.run_sync(h.pread, k, pos))
                pos += k
            healthy = True
            return chunks
        except nbd.Error as e:
            try:
                if h.aio_is_dead() or h.aio_is_closed():
                    self.broken = True  # the next open() starts a new server
            except nbd.Error:  # pragma: no cover
                self.broken = True
            raise DiskViewError(
                f"reading snapshot {self.tag!r} of {self.image} at {offset}: {e}"
            ) from e
        finally:
            self.release(h, healthy)


class DiskView:
    """An open, read-only raw view of one disk snapshot.  Close it with
    :meth:`DiskViews.close` (or :meth:`aclose` / ``async with``)."""

    __slots__ = ("_views", "_server", "_closed", "_next", "_ra", "_buf", "_buf_off", "_fill")

    def __init__(self, views: DiskViews, server: _Server) -> None:
        self._views = views
        self._server = server
        self._closed = False
        # Read-ahead: sequential small reads (FUSE asks for 128 KiB) are served
        # from one larger NBD read kept in _buf.  The snapshot never changes,
        # so the buffer never goes stale.
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
        return self._server.size

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
        srv = self._server
        end = min(offset + size, srv.size)
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
            return await srv.read(offset, end - offset)
        async with self._fill:
            hit = self._cached(offset, end)  # filled while we waited
            if hit is not None:
                return hit
            self._ra = min(limit, max(self._ra * 2, READAHEAD_MIN, 2 * (end - offset)))
            data = await srv.read(offset, self._ra)
            self._buf, self._buf_off = data, offset
            return data[: end - offset]

    async def aclose(self) -> None:
        await self._views.close(self)

    async def __aenter__(self) -> DiskView:
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


class DiskViews:
    """The disk views of this process: qemu-nbd servers, refcounted per snapshot.

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
    ) -> None:
        if max_handles < 1:
            raise ValueError("max_handles must be at least 1")
        self.run_dir = Path(run_dir)
        self.nbd_dir = _nbd_dir(run_dir)
        self.idle = idle
        self.max_handles = max_handles
        self.readahead = readahead
        self.qemu_nbd = qemu_nbd
        self.qemu_img = qemu_img
        info = _proc_info(os.getpid())
        self.owner_start = info.start if info else None
        self.nbd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.nbd_dir, 0o700)
        reap_stale(self.run_dir)
        self._servers: dict[tuple[int, int, str], _Server] = {}
        self._closed = False
        self._janitor: trio.CancelScope | None = None
        self._wakeup = trio.Event()

    # -- public API ------------------------------------------------------------

    async def open(self, image: Path, tag: str) -> DiskView:
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
        self._ensure_janitor()
        while True:
            srv = self._servers.get(key)
            if srv is None:
                srv = _Server(self, path, st, tag)
                self._servers[key] = srv
            async with srv.lock:
                if srv.dead:  # stopped while we waited for the lock
                    continue
                if srv.running and (
                    srv.broken or srv.proc is None or srv.proc.poll() is not None
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

    async def close(self, view: DiskView) -> None:
        """Release ``view``; the server stops ``idle`` seconds after its last view."""
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

    async def __aenter__(self) -> DiskViews:
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
        argv = [self.qemu_img, "info", "-U", "--output=json", "--image-opts", _image_opts(image)]
        try:
            res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        except OSError as e:
            raise DiskViewError(f"cannot run {self.qemu_img}: {e}") from e
        if res.returncode != 0:
            text = res.stderr.decode(errors="replace").strip()
            why = "; ".join(ln.removeprefix("qemu-img: ") for ln in text.splitlines()) or (
                f"exit status {res.returncode}"
            )
            raise DiskViewError(f"cannot read snapshots of {image}: {why}", _classify(text))
        try:
            snaps = json.loads(res.stdout).get("snapshots") or []
        except ValueError as e:
            raise DiskViewError(f"bad qemu-img info output for {image}: {e}") from e
        for s in snaps:
            if s.get("name") == tag:
                keys = ("id", "name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")
                return {k: s.get(k) for k in keys}
        return None

    async def _still_valid(self, srv: _Server) -> bool:
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

    def _forget(self, srv: _Server) -> None:
        srv.dead = True
        key = (srv.dev, srv.ino, srv.tag)
        if self._servers.get(key) is srv:
            del self._servers[key]

    def _park(self, srv: _Server) -> None:
        srv.idle_deadline = trio.current_time() + self.idle
        srv.try_write_record()
        self._wakeup.set()

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._run_janitor, self._janitor, name="diskview-janitor")

    async def _run_janitor(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                while True:
                    try:
                        await self._janitor_pass()
                    except Exception:  # noqa: BLE001 - a system task must not crash
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
        for srv in list(self._servers.values()):
            try:
                srv.kill_now()
            except Exception:  # noqa: BLE001
                logger.exception("stopping %r", srv)
            self._forget(srv)
