"""The record files through which every process sees which snapshots are exported.

Files (``<run dir>/nbd``, mode 0700)
    ``<pid>-<token>.sock``  a server's Unix socket
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
    count as exported; instead, before an idle server is reused, its owner
    reads the snapshot table again and restarts the server (or fails the open
    with ENOENT) if the snapshot was deleted or re-created meanwhile.

Crashes
    Whatever a crash leaves behind (records, sockets, servers whose owner is
    gone) is removed by :func:`reap_stale`, which :class:`DiskViews` runs when
    it is constructed.
"""

import errno as _errno
import json
import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

from ..config import nbd_dir
from ..errors import SnapfsError
from ..files import atomic_write
from ..procfs import DEAD_STATES, alive, cmdline, pids, proc_info

__all__ = ["STOP_TIMEOUT", "DiskViewError", "Recorded", "exported", "reap_stale",
           "store_record"]

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0
"""Seconds qemu-nbd gets to exit after each signal."""
RECORD_VERSION = 1
STALE_TMP_AGE = 60.0
"""A temporary record file this many seconds old was left by a crashed writer."""


class DiskViewError(SnapfsError):
    """A view could not be opened or read; ``errno`` says why (ENOENT, EIO, ...)."""

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class Recorded:
    """What keeps a record of its view in ``<run dir>/nbd`` (a qemu-nbd server, an
    in-process view): ``write_record`` stores it, ``try_write_record`` when a
    failure to update it must not fail the read or the close that asks."""

    record: Path

    def write_record(self) -> None:
        raise NotImplementedError

    def try_write_record(self) -> None:
        try:
            self.write_record()
        except OSError as e:
            logger.error("cannot update view record %s: %s", self.record, e)


def store_record(
    path: Path,
    *,
    image: Path,
    dev: int,
    ino: int,
    tag: str,
    socket: Path,
    server_pid: int | None,
    server_start: int | None,
    owner_start: int | None,
    refs: int,
    snapshot: dict[str, Any] | None,
) -> None:
    """Replace the record of a server owned by this process."""
    rec = {
        "version": RECORD_VERSION,
        "image": str(image),
        "dev": dev,
        "ino": ino,
        "tag": tag,
        "socket": str(socket),
        "server_pid": server_pid,
        "server_start": server_start,
        "owner_pid": os.getpid(),
        "owner_start": owner_start,
        "refs": refs,
        "snapshot": snapshot,
        "updated": time.time(),
    }
    # Runtime state on /run: a host crash wipes it, so no fsync.
    atomic_write(path, json.dumps(rec, sort_keys=True), 0o600, durable=False)


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``; None when it is gone, empty when it is garbage."""
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


def _record_in_use(rec: dict[str, Any]) -> bool:
    """A view is open on this record's server (or the server is starting)."""
    if not alive(rec.get("owner_pid"), rec.get("owner_start")):
        return False
    if int(rec.get("refs", 0) or 0) <= 0:
        return False
    server = rec.get("server_pid")
    if server is None:  # starting: the owner is about to export the snapshot
        return True
    # A server whose parent is not the owner was reparented: its owner lost it.
    info = proc_info(int(server))
    return (
        info is not None
        and info.state not in DEAD_STATES
        and info.start == rec.get("server_start")
        and info.ppid == rec.get("owner_pid")
    )


def _same_image(rec: dict[str, Any], st: os.stat_result | None, image: str) -> bool:
    if st is not None and rec.get("dev") == st.st_dev and rec.get("ino") == st.st_ino:
        return True
    return rec.get("image") in (image, os.path.realpath(image))


def _socket_arg(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("--socket="):
            return arg[len("--socket=") :]
    return None


def _our_servers(d: Path) -> dict[int, str]:
    """qemu-nbd processes (any owner) whose socket lives in ``d``: pid -> socket."""
    found: dict[int, str] = {}
    prefix = str(d) + os.sep
    for pid in pids():
        argv = cmdline(pid)
        if not argv or not os.path.basename(argv[0]).startswith("qemu-nbd"):
            continue
        sock = _socket_arg(argv)
        if sock and sock.startswith(prefix) and os.sep not in sock[len(prefix) :]:
            found[pid] = sock
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
        info = proc_info(pid)
        sock = _socket_arg(cmdline(pid))
        if info is None or (start is not None and info.start != start):
            return False
        if sock is None or os.path.dirname(sock) != str(d):
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            if _wait_fd(pidfd, STOP_TIMEOUT):
                return True
        logger.error("qemu-nbd pid %d did not die", pid)
        return True
    finally:
        os.close(pidfd)


def exported(run_dir: Path, image: Path, tag: str) -> bool:
    """True while some live process has a view open on snapshot ``tag`` of ``image``.

    Reads the records in ``<run_dir>/nbd``; a record counts when its owner
    process is alive, at least one view is open and its qemu-nbd is running
    (or still starting).  Servers that only idle after the last close do not
    count: their owner re-checks the snapshot before reusing them.  Use it to
    refuse deleting the snapshot (EBUSY).
    """
    path = os.path.abspath(image)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    return any(
        rec.get("tag") == tag and _same_image(rec, st, path) and _record_in_use(rec)
        for _, rec in _records(nbd_dir(run_dir))
    )


def reap_stale(run_dir: Path) -> int:
    """Stop servers and remove sockets/records left by dead owner processes.

    Returns how many servers or leftover files were cleaned.  Safe to run at
    any time from any process: servers whose owner is alive are left alone.
    """
    d = nbd_dir(run_dir)
    if not d.is_dir():
        return 0
    cleaned = 0
    for path, rec in _records(d):
        if alive(rec.get("owner_pid"), rec.get("owner_start")):
            continue
        server = rec.get("server_pid")
        if server and _terminate_foreign(int(server), rec.get("server_start"), d):
            logger.info(
                "stopped stale qemu-nbd pid %s (snapshot %r of %s, owner pid %s gone)",
                server, rec.get("tag"), rec.get("image"), rec.get("owner_pid"),
            )
        sock = rec.get("socket")
        if isinstance(sock, str) and os.path.dirname(sock) == str(d):
            Path(sock).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        cleaned += 1
    # Servers without a live owner record: owner died before/after writing it,
    # or was reparented (its owner process exited).  Decide on a fresh read of
    # the record: a live owner writes it before the server starts.
    for pid, sock in _our_servers(d).items():
        live = _read_record(Path(sock).with_suffix(".json"))
        if live and alive(live.get("owner_pid"), live.get("owner_start")):
            info = proc_info(pid)
            if info is None or info.ppid == live.get("owner_pid"):
                continue
        if _terminate_foreign(pid, None, d):
            logger.info("stopped orphaned qemu-nbd pid %d (%s)", pid, sock)
            cleaned += 1
    # Sockets whose record is gone, and temporary files of crashed writers
    # (atomic_write names them ".<record>.tmp<pid>").
    now = time.time()
    for name in os.listdir(d):
        p = d / name
        if name.endswith(".sock") and not p.with_suffix(".json").exists():
            p.unlink(missing_ok=True)
            cleaned += 1
        elif name.startswith(".") and ".tmp" in name:
            try:
                if now - p.stat().st_mtime > STALE_TMP_AGE:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
    return cleaned
