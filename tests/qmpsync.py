"""A tiny synchronous QMP client for tests (stdlib socket + json only).

Tests use it to look at a guest independently of snapfs's own asyncio client.
QEMU's QMP socket serves one client at a time: connect, do the work, close.
A second client would sit in the listen backlog without a greeting, which
shows up here as a timeout rather than a hang.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from guestbuild import COUNTER_ADDR, MAGIC, MAGIC_ADDR


class QMPError(Exception):
    """QEMU answered a command with an error, or the protocol broke."""


class GuestNotReady(Exception):
    """The guest's magic is not (yet) in memory: still in the BIOS, or not our code."""


class QMP:
    """A connected QMP session; use as a context manager.

    `cmd` passes keyword arguments verbatim, so names with dashes go in as
    `cmd("human-monitor-command", **{"command-line": "info status"})`.
    Asynchronous events received while waiting for a reply are kept in
    `events` rather than returned.
    """

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._next_id = 0

    def __enter__(self) -> QMP:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            self._sock = sock
            self._file = sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting: {greeting!r}")
            self.greeting = greeting
            self.cmd("qmp_capabilities")
        except TimeoutError as e:
            self.close()
            raise QMPError(
                f"{self.path}: no QMP greeting within {self.timeout}s "
                "(is another client connected?)"
            ) from e
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QMPError(f"{self.path}: QEMU closed the QMP connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run one command and return its "return" value; raise QMPError on error."""
        if self._sock is None:
            raise QMPError("QMP session is not connected")
        self._next_id += 1
        req: dict[str, Any] = {"execute": name, "id": self._next_id}
        if args:
            req["arguments"] = args
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._next_id:
                raise QMPError(f"reply to another request: {msg!r}")
            if "error" in msg:
                err = msg["error"]
                raise QMPError(f"{name}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")


def hmp(qmp: QMP, command_line: str) -> str:
    """Run a human monitor command and return its text output."""
    out = qmp.cmd("human-monitor-command", **{"command-line": command_line})
    return str(out)


def qemu_io(qmp: QMP, target: str, command: str, qdev: bool = False) -> None:
    """Run a qemu-io command (e.g. "write -P 0xab 0 4k") inside the running QEMU.

    Only failures to find or open the target come back through HMP (and are
    raised here as QMPError).  qemu-io's own messages, including "wrote ...",
    range errors and `read -P` mismatches, go to QEMU's stdout, which is
    /dev/null for a daemonized QEMU: a bad command is silently a no-op, so
    check the result by reading the image back (e.g. `qemu-io -r -c
    "read -P 0xab 0 4k"`, exit status 1 on mismatch) after QEMU has quit.

    Targets that work, checked on QEMU 7.2 by writing, quitting and reading
    back with qemu-io:

    - `-drive file=X,format=qcow2,if=virtio,id=vda`: target "vda" (the drive
      id is the BlockBackend name).  "-d vda" does not work: "vda" is not a
      device id.  The device is anonymous, so with qdev=True its QOM path
      "/machine/peripheral-anon/device[0]/virtio-backend" works.
    - `-drive ...,if=none,id=drv0 -device virtio-blk-pci,drive=drv0,id=vdev0`:
      "drv0", or qdev=True with "vdev0/virtio-backend".
    - `-blockdev driver=qcow2,node-name=disk0,... -device
      virtio-blk-pci,drive=disk0,id=vdev0`: qdev=True with
      "vdev0/virtio-backend" (or "/machine/peripheral/vdev0/virtio-backend");
      -d needs the virtio-backend child because the PCI proxy "vdev0" holds
      no BlockBackend.  The node name "disk0" works only if the device has
      share-rw=on; otherwise HMP answers "Permission conflict on node
      'disk0' ...".  The same holds when node and device share a name
      (snapfs's own layout, node-name=vda + id=vda): use "vda/virtio-backend".
    - `-device scsi-hd,drive=vdb,id=vdb,...`: qdev=True with "vdb" (the
      SCSI device itself holds the BlockBackend).
    """
    flag = "-d " if qdev else ""
    escaped = command.replace("\\", "\\\\").replace('"', '\\"')
    out = hmp(qmp, f'qemu-io {flag}{target} "{escaped}"')
    if out.strip():
        raise QMPError(f"qemu-io {flag}{target} {command!r}: {out.strip()}")


def read_memory(qmp: QMP, addr: int, size: int, workdir: Path) -> bytes:
    """Read guest-physical memory through pmemsave into a temp file in workdir.

    workdir must be absolute: a daemonized QEMU runs with cwd "/".
    """
    workdir = workdir.resolve()
    with tempfile.NamedTemporaryFile(dir=workdir, prefix="pmem-") as tmp:
        qmp.cmd("pmemsave", val=addr, size=size, filename=tmp.name)
        return Path(tmp.name).read_bytes()


def peek_counter(qmp: QMP, workdir: Path) -> int:
    """Return the guest's tick counter; raise GuestNotReady if the magic is absent."""
    data = read_memory(qmp, MAGIC_ADDR, len(MAGIC) + 4, workdir)
    if data[: len(MAGIC)] != MAGIC:
        raise GuestNotReady(f"no magic at {MAGIC_ADDR:#x}: {data[:len(MAGIC)]!r}")
    assert MAGIC_ADDR + len(MAGIC) == COUNTER_ADDR
    return int.from_bytes(data[len(MAGIC):], "little")


def read_counter(qmp_sock: str | Path, workdir: Path) -> int:
    """Connect to a VM's QMP socket and return the guest's tick counter."""
    with QMP(qmp_sock) as qmp:
        return peek_counter(qmp, workdir)


def wait_for_guest(qmp_sock: str | Path, workdir: Path,
                   timeout: float = 60.0, interval: float = 0.1) -> int:
    """Poll until the guest's magic is visible; return the counter then."""
    deadline = time.monotonic() + timeout
    with QMP(qmp_sock) as qmp:
        while True:
            try:
                return peek_counter(qmp, workdir)
            except GuestNotReady:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(interval)
