"""The demo behind scripts/demo: a domain booting a tiny guest that counts timer
ticks in its memory, snapshotted and reverted through the CLI and the tree."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from guestbuild import build_boot_sector, make_disk  # noqa: E402
from qmpsync import read_counter, wait_for_guest  # noqa: E402

BASE = Path(os.environ.get("SNAPFS_DEMO_DIR", "/tmp/snapfs-demo"))
DIRS = {"SNAPFS_CONFIG_DIR": str(BASE / "cfg"), "SNAPFS_STATE_DIR": str(BASE / "state"),
        "SNAPFS_RUN_DIR": str(BASE / "run")}
MNT = BASE / "snap"
SNAPFS = str(ROOT / ".venv" / "bin" / "snapfs")


def sh(cmd: str, check: bool = True) -> str:
    """Show a command as a user would type it, run it, show its output."""
    print(f"\n$ {cmd}", flush=True)
    proc = subprocess.run(cmd, shell=True, text=True, capture_output=True,
                          env={**os.environ, **DIRS, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"})
    print((proc.stdout + proc.stderr).rstrip(), flush=True)
    if check and proc.returncode != 0:
        sys.exit(f"demo: `{cmd}` failed")
    return proc.stdout


def counter() -> int:
    return read_counter(BASE / "run" / "demo.qmp", BASE)


def stop() -> None:
    if MNT.is_mount():
        subprocess.run(["fusermount3", "-u", str(MNT)], check=False)
    if (BASE / "run" / "demo.pid").exists():
        subprocess.run([SNAPFS, "domain", "stop", "--force", "demo"], env={**os.environ, **DIRS},
                       capture_output=True, check=False)
    subprocess.run(["rm", "-rf", str(BASE)], check=False)


def main() -> None:
    if sys.argv[1:] == ["stop"]:
        stop()
        print("demo stopped and removed")
        return
    stop()
    (BASE / "img").mkdir(parents=True)
    boot = build_boot_sector(BASE)
    disk = make_disk(BASE / "img" / "demo.qcow2", boot)
    accel = "kvm" if os.access("/dev/kvm", os.W_OK) else "tcg"
    (BASE / "demo.toml").write_text(
        f'name = "demo"\nmemory = "64M"\naccel = "{accel}"\n\n'
        f'[[disks]]\ndev = "vda"\nfile = "{disk}"\n')
    print(f"# The demo's dirs: {' '.join(f'{k}={v}' for k, v in DIRS.items())}")
    sh(f"snapfs domain define {BASE / 'demo.toml'}")
    sh("snapfs domain start demo")
    wait_for_guest(BASE / "run" / "demo.qmp", BASE, timeout=90)
    print(f"# the guest counts timer ticks in its memory: counter = {counter()}")
    sh("snapfs vm-snapshot-create -n first demo")
    at_snapshot = counter()
    time.sleep(2)
    print(f"# two seconds later: counter = {counter()} (snapshot taken at about {at_snapshot})")
    sh("snapfs vm-snapshot-list demo")
    sh("snapfs disk-snapshot-list demo")
    sh("snapfs vm-snapshot-apply -n first demo")
    print(f"# after apply: counter = {counter()}: the guest went back in time")

    MNT.mkdir()
    if sh(f"snapfs mount {MNT}", check=False) is not None and MNT.is_mount():
        sh(f"ls -l {MNT}/demo")
        sh(f"mkdir {MNT}/demo/from-the-shell")
        sh(f"ls -l {MNT}/demo/from-the-shell")
        sh(f"cat {MNT}/demo/from-the-shell/snapshotdata.xl")
        sh(f"cat {MNT}/demo/.status")
        sh(f"echo running > {MNT}/demo/first/apply")
        sh(f"rmdir {MNT}/demo/from-the-shell")
    sh("snapfs vm-snapshot-delete -n first demo")
    sh("snapfs vm-snapshot-create -n kept demo")
    print("\n# The demo domain keeps running" + (f" and its tree stays mounted: ls {MNT}/demo"
                                                 if MNT.is_mount() else "") + ".")
    print(f"# Try: {' '.join(f'{k}={v}' for k, v in DIRS.items())} {shlex.quote(SNAPFS)} vm-snapshot-list demo")
    print("# Take it down with: scripts/demo stop")


if __name__ == "__main__":
    main()
