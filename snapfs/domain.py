"""A domain's QEMU process: its command line, start, stop and run state.

QEMU runs daemonized with its QMP socket and pidfile in the run dir, so it
outlives the snapfs process that started it and any snapfs process can find it.
"""

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import trio

from . import qmp
from .config import Dirs, DomainDef
from .errors import AlreadyExists, ConfigError, NotFound, QemuError, StateError
from .images import run_tool

__all__ = ["Paths", "qemu_command", "running_pid", "start", "quit", "powerdown",
           "run_state", "kvm_device"]

logger = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# How long QEMU may take to answer QMP or to exit after ``quit``.
QMP_TIMEOUT = 30.0
_BUS_DEVICE = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd"}


def kvm_device() -> Path:
    # Tests and containers point this elsewhere to show the "no KVM" error.
    return Path(os.environ.get("SNAPFS_KVM_DEVICE", "/dev/kvm"))


class Paths:
    """The files a running domain has in the run dir."""

    def __init__(self, dirs: Dirs, name: str) -> None:
        self.qmp = dirs.run / f"{name}.qmp"
        self.pid = dirs.run / f"{name}.pid"
        self.lock = dirs.run / f"{name}.lock"
        self.log = dirs.run / f"{name}.log"


def _opt(value: str) -> str:
    # QEMU's option syntax splits on commas; a doubled comma is a literal one.
    return value.replace(",", ",,")


def qemu_command(dom: DomainDef, dirs: Dirs, formats: dict[str, str], *,
                 paused: bool = False, incoming: bool = False) -> list[str]:
    """The QEMU command line of ``dom``; ``formats`` maps each dev to its image format."""
    paths = Paths(dirs, dom.name)
    machine = f"{dom.machine},accel={dom.accel}" if dom.machine else f"accel={dom.accel}"
    cmd = [
        QEMU, "-name", f"guest={dom.name},process=snapfs:{dom.name}", "-uuid", dom.uuid,
        "-machine", machine, "-m", f"{dom.memory_mib}M", "-smp", str(dom.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-daemonize", "-pidfile", str(paths.pid), "-D", str(paths.log),
        "-qmp", f"unix:{_opt(str(paths.qmp))},server=on,wait=off",
    ]
    if any(d.bus == "scsi" for d in dom.disks):
        cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(dom.disks):
        node: dict[str, Any] = {"node-name": disk.dev, "driver": formats[disk.dev],
                                "file": {"driver": "file", "filename": str(disk.file)}}
        device: dict[str, Any] = {"driver": _BUS_DEVICE[disk.bus], "drive": disk.dev, "id": disk.dev}
        if disk.bus == "scsi":
            device["bus"] = "scsi0.0"
        if index == 0:
            # SeaBIOS tries only the first hard disk it finds, and that need not be ours.
            device["bootindex"] = 0
        cmd += ["-blockdev", json.dumps(node), "-device", json.dumps(device)]
    if paused or incoming:
        cmd.append("-S")
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd + list(dom.extra_args)


def last_words(dirs: Dirs, name: str) -> str:
    """QEMU's last error message: with -D, a daemonized QEMU keeps stderr in that log."""
    try:
        lines = Paths(dirs, name).log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.removeprefix(f"{QEMU}: ") for line in lines if ": warning:" not in line]
    return "; ".join(errors[-2:])


def read_position(dirs: Dirs, name: str, path: Path) -> int:
    """How far the domain's QEMU has read ``path`` (its file offset), 0 if unknown."""
    pid = running_pid(dirs, name)
    if pid is None:
        return 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(info.split("pos:", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def running_pid(dirs: Dirs, name: str) -> int | None:
    """The pid of the domain's QEMU if it is alive, checked against its command line."""
    paths = Paths(dirs, name)
    try:
        pid = int(paths.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # A recycled pid belongs to another program: trust it only if it is our QEMU.
    if str(paths.qmp).replace(",", ",,").encode() not in cmdline:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    return pid


async def start(dirs: Dirs, dom: DomainDef, formats: dict[str, str], *, paused: bool = False,
                incoming: bool = False) -> int:
    """Start QEMU daemonized; returns its pid once QMP answers.

    :raise AlreadyExists: when the domain already runs.
    :raise ConfigError: when it asks for KVM and the host has none.
    """
    if running_pid(dirs, dom.name):
        raise AlreadyExists(f"domain {dom.name!r} is already running")
    if dom.accel == "kvm" and not kvm_device().exists():
        raise ConfigError(f"domain {dom.name!r} asks for accel = \"kvm\" but {kvm_device()} "
                          "does not exist; use accel = \"tcg\" or enable KVM")
    for disk in dom.disks:
        if not disk.file.exists():
            raise NotFound(f"domain {dom.name!r}: disk {disk.dev} file {disk.file} does not exist")
    dirs.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = Paths(dirs, dom.name)
    for stale in (paths.qmp, paths.pid):
        stale.unlink(missing_ok=True)
    await run_tool(qemu_command(dom, dirs, formats, paused=paused, incoming=incoming),
                   f"starting domain {dom.name!r}")
    pid = running_pid(dirs, dom.name)
    if pid is None:
        raise QemuError(f"domain {dom.name!r}: QEMU exited right after starting: "
                        f"{last_words(dirs, dom.name) or f'see {paths.log}'}")
    return pid


async def wait_exit(dirs: Dirs, name: str, pid: int) -> None:
    while running_pid(dirs, name) == pid:
        await trio.sleep(0.02)


async def quit(dirs: Dirs, name: str) -> None:
    """Make QEMU exit now (QMP ``quit``, SIGKILL if it will not), and wait until it has."""
    pid = running_pid(dirs, name)
    if pid is None:
        return
    with trio.move_on_after(QMP_TIMEOUT):
        try:
            async with qmp.connect(Paths(dirs, name).qmp) as mon:
                await mon.execute("quit")
        except QemuError as err:
            logger.warning("domain %s: quit over QMP failed (%s); killing pid %d", name, err, pid)
            os.kill(pid, signal.SIGKILL)
        await wait_exit(dirs, name, pid)
        return
    logger.warning("domain %s: QEMU did not exit after quit; killing pid %d", name, pid)
    os.kill(pid, signal.SIGKILL)
    await wait_exit(dirs, name, pid)


async def powerdown(dirs: Dirs, name: str, timeout: float) -> bool:
    """ACPI power button, then wait up to ``timeout`` s; true if the guest shut down."""
    pid = running_pid(dirs, name)
    if pid is None:
        raise StateError(f"domain {name!r} is not running")
    async with qmp.connect(Paths(dirs, name).qmp) as mon:
        await mon.execute("system_powerdown")
    with trio.move_on_after(timeout):
        await wait_exit(dirs, name, pid)
        return True
    return False


async def run_state(mon: qmp.Monitor) -> str:
    """``running`` or ``paused`` (any stopped state: paused, inmigrate, postmigrate...)."""
    status = await mon.execute("query-status")
    return "running" if status.get("running") else "paused"
