"""The test guest boots, counts timer ticks, and its disk can be written over QMP.

This checks the fixtures other tests rely on (tests/guest/counter.S,
guestbuild, qmpsync) against a real QEMU.  SNAPFS_TEST_ACCEL=tcg forces
software emulation; by default /dev/kvm is used when it is accessible.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from guestbuild import TICK_HZ, build_boot_sector, make_disk
from qmpsync import QMP, qemu_io, read_counter, wait_for_guest

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")


def accel() -> str:
    forced = os.environ.get("SNAPFS_TEST_ACCEL")
    if forced:
        return forced
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the parenthesised command name; a zombie is gone.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def running_qemu(workdir: Path, disk: Path) -> Iterator[Path]:
    """Start a daemonized QEMU booting disk; yield its QMP socket; make sure it ends."""
    sock = workdir / "qmp.sock"
    pidfile = workdir / "qemu.pid"
    # sun_path is limited to 108 bytes; fail clearly rather than inside QEMU.
    assert len(str(sock)) < 100, f"QMP socket path too long: {sock}"
    subprocess.run(
        [QEMU, "-accel", accel(), "-m", "32", "-display", "none", "-nic", "none",
         "-daemonize", "-pidfile", str(pidfile),
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-drive", f"file={disk},format=qcow2,if=virtio,id=vda"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    pid = int(pidfile.read_text())
    try:
        yield sock
    finally:
        try:
            with QMP(sock, timeout=5) as qmp:
                qmp.cmd("quit")
        except Exception:
            pass  # already dead, or wedged: the kill below covers it
        if not wait_gone(pid, EXIT_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, EXIT_TIMEOUT)
            pytest.fail(f"QEMU {pid} did not exit after quit; killed")


def test_guest_counts_and_disk_writes(tmp_path: Path) -> None:
    boot = build_boot_sector(tmp_path)
    disk = make_disk(tmp_path / "disk.qcow2", boot)
    pattern, offset, length = 0xAB, 1 << 20, 4096  # past sector 0: keep it bootable

    start = time.monotonic()
    with running_qemu(tmp_path, disk) as sock:
        wait_for_guest(sock, tmp_path, timeout=BOOT_TIMEOUT)
        boot_time = time.monotonic() - start

        t0, c0 = time.monotonic(), read_counter(sock, tmp_path)
        time.sleep(1.0)
        t1, c1 = time.monotonic(), read_counter(sock, tmp_path)
        rate = (c1 - c0) / (t1 - t0)
        print(f"accel={accel()} magic after {boot_time:.2f}s, {rate:.1f} ticks/s")
        # Loose bounds: several guests may share 2 host cores.
        assert TICK_HZ * 0.3 <= rate <= TICK_HZ * 3, rate

        with QMP(sock) as qmp:
            qemu_io(qmp, "vda", f"write -P {pattern:#x} {offset} {length}")

    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)],
                   check=True)
    data = raw.read_bytes()
    assert data[offset:offset + length] == bytes([pattern]) * length
    assert data[offset - 512:offset] == bytes(512)
    assert data[offset + length:offset + length + 512] == bytes(512)
    assert data[:512] == boot.read_bytes()
