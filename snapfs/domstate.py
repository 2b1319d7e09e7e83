"""A domain's state as its run dir and its QEMU tell it, read without trio.

``domain status`` and ``domain list`` are asked from shells and scripts, often
in a loop, and the answer is a few small files, ``/proc`` and one QMP command:
everything here is blocking and quick, so the CLI can answer before it would
have finished importing trio, and the engine calls it from a worker thread.

    running_pid      the domain's QEMU, if its pidfile names a live process that is ours
    last_words       QEMU's last error message, from its -D log
    Records          the operation in progress, the last error, the state last seen
    observed_state   running, paused, shut off or crashed (and why)

The one QMP command, ``query-status``, goes over a plain socket: qemu.qmp is
an asyncio library, and its import and event loop would cost more than the
answer. Everything else that speaks QMP goes through ``qmp.py``.
"""

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from . import procfs, trace
from .config import RunPaths
from .files import atomic_write, make_dirs
from .status import Progress, RunState

__all__ = ["running_pid", "last_words", "Records", "observed_state", "QEMU", "STATUS_TIMEOUT",
           "CRASH_STATUSES"]

logger = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
STATUS_TIMEOUT = 2.0    # how long `domain status` waits for QEMU's answer
# QEMU's run states in which the guest cannot go on: a KVM internal error, a
# guest kernel panic reported through pvpanic.
CRASH_STATUSES = ("internal-error", "guest-panicked")


def last_words(paths: RunPaths) -> str:
    """QEMU's last error message: with -D, a daemonized QEMU keeps stderr in that log."""
    try:
        lines = paths.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.removeprefix(f"{QEMU}: ") for line in lines if ": warning:" not in line]
    return "; ".join(errors[-2:])


def running_pid(paths: RunPaths) -> int | None:
    """The pid of the domain's QEMU if it is alive, checked against its command line."""
    try:
        pid = int(paths.pid.read_text().strip())
    except (OSError, ValueError):
        return None
    # A recycled pid belongs to another program: trust it only if it is our QEMU.
    if paths.qmp_argument not in procfs.cmdline(pid) or not procfs.alive(pid):
        return None
    return pid


class Records:
    """A domain's run-dir records of operations: progress, last error, state last seen."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def record_error(self, message: str) -> None:
        try:
            make_dirs(self.paths.run, 0o700)
            from datetime import datetime  # only failures are dated: not at start-up
            when = datetime.now().astimezone().isoformat(timespec="seconds")
            atomic_write(self.paths.error, f"{when} {message}\n", mode=0o644, durable=False)
        except OSError as err:
            logger.warning("cannot record last error in %s: %s", self.paths.error, err)

    def last_error(self) -> str:
        try:
            return self.paths.error.read_text().strip()
        except OSError:
            return ""

    def write_progress(self, progress: Progress) -> None:
        try:
            atomic_write(self.paths.op, json.dumps(asdict(progress)), mode=0o644, durable=False)
        except OSError as err:
            logger.debug("cannot record progress in %s: %s", self.paths.op, err)

    def read_progress(self) -> Progress | None:
        """The operation in progress, if the process running it is alive (a dead
        one's operation is the journal's to recover)."""
        try:
            progress = Progress(**json.loads(self.paths.op.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        try:
            os.kill(progress.pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return progress

    def end_progress(self) -> None:
        self.paths.op.unlink(missing_ok=True)

    def remember_state(self, state: RunState) -> None:
        """Keep the state for ``domain status`` while an operation holds the monitor."""
        try:
            atomic_write(self.paths.state, state.value, mode=0o644, durable=False)
        except OSError as err:
            logger.debug("cannot record state in %s: %s", self.paths.state, err)

    def remembered_state(self) -> RunState:
        try:
            return RunState(self.paths.state.read_text().strip())
        except (OSError, ValueError):
            return RunState.RUNNING


def observed_state(paths: RunPaths, busy: bool) -> tuple[RunState, str]:
    """The run state and, when crashed, why; without waiting: while an operation
    holds the monitor (``busy``), or QEMU does not answer within STATUS_TIMEOUT,
    the state the last operation recorded."""
    if running_pid(paths) is None:
        # QEMU removes its pidfile when it exits, and snapfs when it kills it.
        if paths.pid.exists():
            words = last_words(paths)
            return RunState.CRASHED, "QEMU exited without being stopped" + (
                f": {words}" if words else "")
        return RunState.SHUTOFF, ""
    records = Records(paths)
    if busy:
        return records.remembered_state(), ""
    try:
        status = _query_status(paths)
    except BlockingIOError:
        return records.remembered_state(), ""
    except (OSError, ValueError) as err:
        logger.debug("status of %s: %s", paths.qmp, err)
        return records.remembered_state(), ""
    state, reason = RunState.RUNNING if status.get("running") else RunState.PAUSED, ""
    if status.get("status") in CRASH_STATUSES:
        state = RunState.CRASHED
        words = last_words(paths)
        reason = f"QEMU stopped the guest: {status['status']}" + (f" ({words})" if words else "")
    records.remember_state(state)
    return state, reason


def _query_status(paths: RunPaths) -> dict[str, Any]:
    """QMP ``query-status`` over the domain's socket, within STATUS_TIMEOUT in all.

    :raise BlockingIOError: when an operation holds the domain's lock.
    :raise OSError: when QEMU cannot be reached or does not answer in time.
    :raise ValueError: when it answers with an error or something not QMP.
    """
    # Asked only while no operation holds the domain's lock, and holding it: QEMU
    # serves one monitor client at a time, and an operation starting meanwhile
    # must find the monitor free (it waits for the lock instead).
    lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)    # BlockingIOError: busy
        return _query_status_locked(paths)
    finally:
        os.close(lock)


def _query_status_locked(paths: RunPaths) -> dict[str, Any]:
    import socket  # only a running domain is asked: not at start-up
    trace.count("qmp connect")
    deadline = time.monotonic() + STATUS_TIMEOUT
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(STATUS_TIMEOUT)
        sock.connect(str(paths.qmp))
        lines = sock.makefile("rb")

        def answer(command: str | None) -> dict[str, Any]:
            if command is not None:
                trace.count(f"qmp {command}")
                sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                line = lines.readline()
                if not line:
                    raise ConnectionResetError(f"QEMU closed {paths.qmp}")
                message = json.loads(line)
                if command is None and "QMP" in message:
                    return dict(message)
                if "error" in message:
                    raise ValueError(f"QEMU refused {command}: {message['error']}")
                if "return" in message:
                    return dict(message["return"])

        answer(None)
        answer("qmp_capabilities")
        return answer("query-status")
