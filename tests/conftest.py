"""Fixtures shared by the tests: temporary snapfs dirs, test domains, the CLI.

Tests drive snapfs through its command line in a subprocess, as a user would,
with their own ``--config-dir/--state-dir/--run-dir``; they look at the guest
through ``qmpsync`` (a QMP client independent of snapfs's own). Every QEMU
started under a test's run dir is killed when the test's dirs are cleaned up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from guestbuild import build_boot_sector, make_disk  # noqa: E402
from qmpsync import QMP, read_counter, wait_for_guest  # noqa: E402

ACCEL = os.environ.get("SNAPFS_TEST_ACCEL") or (
    "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg")
BOOT_TIMEOUT = 90.0


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Env:
    """One set of snapfs dirs with helpers to define domains and run the CLI."""

    def __init__(self, root: Path, boot: Path) -> None:
        self.root = root
        self.boot = boot
        self.config, self.state, self.run, self.images = (root / d for d in ("cfg", "st", "run", "img"))
        for d in (self.config, self.state, self.run, self.images):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def dir_args(self) -> list[str]:
        return ["--config-dir", str(self.config), "--state-dir", str(self.state),
                "--run-dir", str(self.run)]

    def snapfs(self, *args: str, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the CLI; with ``check`` a non-zero exit fails the test, showing stderr."""
        proc = subprocess.run([sys.executable, "-m", "snapfs.cli", *self.dir_args, *args],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, **(env or {})})
        if check and proc.returncode != 0:
            pytest.fail(f"snapfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def fails(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run the CLI expecting a clean failure: one line on stderr, no traceback."""
        proc = self.snapfs(*args, check=False, env=env)
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr.strip()

    def disk(self, name: str, dev: str, boot: bool, fmt: str = "qcow2") -> Path:
        path = self.images / f"{name}-{dev}.{fmt}"
        make_disk(path, self.boot if boot else None, size="16M", fmt=fmt)
        return path

    def write_definition(self, name: str, devs: tuple[str, ...] = ("vda",), memory: str = "32M",
                         fmt: str = "qcow2", extra: str = "") -> Path:
        lines = [f'name = "{name}"', f'memory = "{memory}"', f'accel = "{ACCEL}"', extra]
        for i, dev in enumerate(devs):
            path = self.disk(name, dev, boot=i == 0, fmt=fmt)
            lines += ["[[disks]]", f'dev = "{dev}"', f'file = "{path}"']
        toml = self.root / f"{name}.toml"
        toml.write_text("\n".join(lines) + "\n")
        return toml

    def define(self, name: str, **kw: object) -> None:
        self.snapfs("domain", "define", str(self.write_definition(name, **kw)))  # type: ignore[arg-type]

    def qmp_path(self, name: str) -> Path:
        return self.run / f"{name}.qmp"

    def start(self, name: str) -> None:
        """Start a domain and wait until its guest counts."""
        self.snapfs("domain", "start", name)
        wait_for_guest(self.qmp_path(name), self.root, timeout=BOOT_TIMEOUT)

    def counter(self, name: str) -> int:
        return read_counter(self.qmp_path(name), self.root)

    def run_state(self, name: str) -> str:
        with QMP(self.qmp_path(name)) as qmp:
            return str(qmp.cmd("query-status")["status"])

    def kill_all(self) -> None:
        for pidfile in self.run.glob("*.pid"):
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            if pid_alive(pid) and str(self.run).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)


@pytest.fixture(scope="session")
def boot_sector() -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="sfboot", dir="/tmp"))
    yield build_boot_sector(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


def _make_env(boot: Path) -> Env:
    # QMP socket paths must stay under 108 bytes: keep the root short.
    return Env(Path(tempfile.mkdtemp(prefix="sf", dir="/tmp")), boot)


def _drop_env(env: Env) -> None:
    env.kill_all()
    shutil.rmtree(env.root, ignore_errors=True)


@pytest.fixture
def env(boot_sector: Path) -> Iterator[Env]:
    """Fresh dirs for one test."""
    e = _make_env(boot_sector)
    try:
        yield e
    finally:
        _drop_env(e)


@pytest.fixture(scope="module")
def module_env(boot_sector: Path) -> Iterator[Env]:
    """Dirs shared by a module's tests, so they can share running guests."""
    e = _make_env(boot_sector)
    try:
        yield e
    finally:
        _drop_env(e)
