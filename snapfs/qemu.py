"""A domain's QEMU process: its command line, start, quit, power-down (its pid and
last words are read in ``domstate``, which needs no trio).

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
from .config import NVRAM_DEV, DomainDef, RunPaths, qemu_opt
from .domstate import QEMU, last_words, running_pid
from .errors import AlreadyExists, ConfigError, NotFound, QemuError, StateError
from .files import make_dirs
from .images import run_tool

__all__ = ["qemu_command", "running_pid", "start", "quit", "powerdown", "kvm_device",
           "last_words", "QEMU", "QMP_TIMEOUT", "OVMF_CODE", "OVMF_VARS", "boot_files"]

logger = logging.getLogger(__name__)

# How long QEMU may take to answer QMP or to exit after ``quit``.
QMP_TIMEOUT = 30.0
_BUS_DEVICE = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd"}
# Debian's OVMF (package ovmf): the firmware, read-only, and the variable store
# each UEFI domain's NVRAM starts as a copy of.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
_FIRMWARE_NODE = "ovmf-code"


def kvm_device() -> Path:
    # Tests and containers point this elsewhere to show the "no KVM" error.
    return Path(os.environ.get("SNAPFS_KVM_DEVICE", "/dev/kvm"))


def qemu_command(dom: DomainDef, paths: RunPaths, formats: dict[str, str], *,
                 paused: bool = False, incoming: bool = False) -> list[str]:
    """The QEMU command line of ``dom``; ``formats`` maps each dev to its image format."""
    machine = f"{dom.machine},accel={dom.accel}" if dom.machine else f"accel={dom.accel}"
    if dom.firmware == "uefi":
        machine += f",pflash0={_FIRMWARE_NODE},pflash1={NVRAM_DEV}"
    cmd = [
        QEMU, "-name", f"guest={dom.name},process=snapfs:{dom.name}", "-uuid", dom.uuid,
        "-machine", machine, "-m", f"{dom.memory_mib}M", "-smp", str(dom.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-daemonize", "-pidfile", str(paths.pid), "-D", str(paths.log),
        "-qmp", paths.qmp_argument,
    ]
    if dom.firmware == "uefi":
        cmd += ["-blockdev", json.dumps({
            "node-name": _FIRMWARE_NODE, "driver": "raw", "read-only": True,
            "file": {"driver": "file", "filename": str(OVMF_CODE), "read-only": True}})]
    if any(d.bus == "scsi" for d in dom.disks):
        cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(dom.disks):
        node: dict[str, Any] = {"node-name": disk.dev, "driver": formats[disk.dev],
                                "file": {"driver": "file", "filename": str(disk.file)}}
        cmd += ["-blockdev", json.dumps(node)]
        if disk.bus not in _BUS_DEVICE:
            continue    # the NVRAM: a flash chip of the machine, named above
        device: dict[str, Any] = {"driver": _BUS_DEVICE[disk.bus], "drive": disk.dev,
                                  "id": disk.dev}
        if disk.bus == "scsi":
            device["bus"] = "scsi0.0"
        if index == 0 and dom.kernel is None:
            # SeaBIOS tries only the first hard disk it finds, and that need not be ours.
            # A kernel given to QEMU boots first, and takes bootindex 0 itself.
            device["bootindex"] = 0
        cmd += ["-device", json.dumps(device)]
    for index, nic in enumerate(dom.nics):
        netdev = f"net{index}"
        kind, _, arg = nic.net.partition(":")
        backend = {"user": "user", "tap": f"tap,ifname={qemu_opt(arg)},script=no,downscript=no",
                   "bridge": f"bridge,br={qemu_opt(arg)}"}[kind]
        cmd += ["-netdev", f"{backend},id={netdev}", "-device", json.dumps(
            {"driver": nic.model, "netdev": netdev, "mac": nic.mac, "id": netdev})]
    if dom.kernel is not None:
        cmd += ["-kernel", str(dom.kernel)]
        if dom.initrd is not None:
            cmd += ["-initrd", str(dom.initrd)]
        if dom.cmdline is not None:
            cmd += ["-append", dom.cmdline]
    if paused or incoming:
        cmd.append("-S")
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd + list(dom.extra_args)


def boot_files(dom: DomainDef) -> list[tuple[str, Path]]:
    """The files besides the disks QEMU needs to boot ``dom``, each with its key."""
    files = [("kernel", dom.kernel), ("initrd", dom.initrd)]
    if dom.firmware == "uefi":
        files.append(("firmware", OVMF_CODE))
    return [(key, path) for key, path in files if path is not None]


async def start(paths: RunPaths, dom: DomainDef, formats: dict[str, str], *,
                paused: bool = False, incoming: bool = False) -> int:
    """Start QEMU daemonized; returns its pid once QMP answers.

    :raise AlreadyExists: when the domain already runs.
    :raise ConfigError: when it asks for KVM and the host has none.
    """
    if running_pid(paths):
        raise AlreadyExists(f"domain {dom.name!r} is already running")
    if dom.accel == "kvm" and not kvm_device().exists():
        raise ConfigError(f"domain {dom.name!r} asks for accel = \"kvm\" but {kvm_device()} "
                          "does not exist; use accel = \"tcg\" or enable KVM")
    for disk in dom.disks:
        if not disk.file.exists():
            raise NotFound(f"domain {dom.name!r}: disk {disk.dev} file {disk.file} does not exist")
    for key, path in boot_files(dom):
        if not path.exists():
            raise NotFound(f"domain {dom.name!r}: {key} {path} does not exist"
                           + (" (install Debian's ovmf package)" if key == "firmware" else ""))
    make_dirs(paths.run, 0o700)
    for stale in (paths.qmp, paths.pid, paths.log):
        stale.unlink(missing_ok=True)
    # QEMU opens its -D log with fopen(): made here first, root-only, so neither
    # a symlink planted in its place nor the umask decides where or how it writes.
    os.close(os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600))
    try:
        await run_tool(qemu_command(dom, paths, formats, paused=paused, incoming=incoming),
                       f"starting domain {dom.name!r}")
    except QemuError as err:
        # A daemonized QEMU reports why it could not start in its -D log, not on
        # stderr: that reason is the message, not "exit status 1".
        words = last_words(paths)
        if not words:
            raise
        raise QemuError(f"starting domain {dom.name!r} failed: {words}") from err
    pid = running_pid(paths)
    if pid is None:
        raise QemuError(f"domain {dom.name!r}: QEMU exited right after starting: "
                        f"{last_words(paths) or f'see {paths.log}'}")
    return pid


async def wait_exit(paths: RunPaths, pid: int) -> None:
    while running_pid(paths) == pid:
        await trio.sleep(0.02)


async def quit(paths: RunPaths, mon: qmp.Monitor | None = None) -> None:
    """Make QEMU exit now (QMP ``quit`` through ``mon`` or a session of its own,
    SIGKILL if it will not), and wait until it has."""
    pid = running_pid(paths)
    if pid is None:
        return
    with trio.move_on_after(QMP_TIMEOUT):
        try:
            if mon is not None:
                await mon.execute("quit")
            else:
                async with qmp.connect(paths.qmp) as own:
                    await own.execute("quit")
        except QemuError as err:
            logger.warning("%s: quit over QMP failed (%s); killing pid %d", paths.qmp, err, pid)
            os.kill(pid, signal.SIGKILL)
        await wait_exit(paths, pid)
        paths.pid.unlink(missing_ok=True)  # stopped on purpose: not a crash
        return
    logger.warning("%s: QEMU did not exit after quit; killing pid %d", paths.qmp, pid)
    os.kill(pid, signal.SIGKILL)
    await wait_exit(paths, pid)
    paths.pid.unlink(missing_ok=True)


async def powerdown(paths: RunPaths, mon: qmp.Monitor, timeout: float) -> bool:
    """ACPI power button, then wait up to ``timeout`` s; true if the guest shut down."""
    pid = running_pid(paths)
    if pid is None:
        raise StateError(f"{paths.qmp}: QEMU is not running")
    await mon.execute("system_powerdown")
    with trio.move_on_after(timeout):
        await wait_exit(paths, pid)
        return True
    return False
