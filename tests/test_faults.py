"""Faults outside snapfs: each gives a clear error, and nothing is lost (issue 6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import Env
from qmpsync import QMP, hmp
from test_recovery import assert_consistent, disk_tags, info_tags, store_dir

DEVS = ("vda", "vdb")


def snapfs_popen(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "snapfs.cli", *env.dir_args, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def small_state_dir(env: Env, size: str) -> Iterator[Path]:
    """A state dir on a tmpfs of ``size``, for saves that run out of room; every
    process of ``env`` is stopped before it is unmounted."""
    small = env.root / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(small)],
                   check=True)
    try:
        env.state = small
        yield small
    finally:
        env.kill_all()
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_no_space_left_while_saving(env: Env) -> None:
    with small_state_dir(env, "256k"):
        env.define("full", devs=DEVS)
        env.start("full")
        message = env.fails("vm-snapshot-create", "-n", "big", "full")
        assert "no space left" in message.lower(), message
        assert env.run_state("full") == "running"
        assert_consistent(env, name="full")
        assert "big" not in info_tags(env, "full")
        assert not [p for p in store_dir(env, "full").iterdir() if p.name.endswith(".save.tmp")]


def test_qemu_dies_during_a_save(env: Env) -> None:
    # 256 MiB of random memory makes the save long enough to kill QEMU in the middle.
    ram = env.root / "ram"
    with ram.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    extra = (f'extra_args = ["-object", "memory-backend-file,id=ram0,size=256M,'
             f'mem-path={ram},share=off", "-machine", "memory-backend=ram0"]')
    env.define("dies", devs=DEVS, memory="256M", extra=extra)
    env.start("dies")
    pid = int((env.run / "dies.pid").read_text())
    proc = snapfs_popen(env, "vm-snapshot-create", "-n", "doomed", "--mode", "paused", "dies")
    tmp = store_dir(env, "dies") / ".doomed.save.tmp"
    deadline = time.monotonic() + 30
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "exited during the snapshot" in err and "no snapshot was kept" in err, err
    assert "Traceback" not in err
    status = json.loads(env.snapfs("domain", "status", "--json", "dies").stdout)
    assert status["state"] == "crashed", status
    assert "exited without being stopped" in status["reason"], status
    assert "doomed" not in info_tags(env, "dies")
    assert all("doomed" not in disk_tags(env, dev, "dies") for dev in DEVS)
    assert not tmp.exists()
    env.start("dies")   # the domain is still usable


def test_qmp_socket_gone(env: Env) -> None:
    env.define("nosock", devs=DEVS)
    env.start("nosock")
    (env.run / "nosock.qmp").unlink()
    message = env.fails("vm-snapshot-create", "-n", "x", "nosock")
    assert "cannot reach QEMU's monitor" in message
    assert "x" not in info_tags(env, "nosock")
    assert all("x" not in disk_tags(env, dev, "nosock") for dev in DEVS)
    assert not list(env.state.glob("snapshots/*/*x.save*"))
    assert env.snapfs("domain", "status", "nosock").returncode == 0


def test_failed_restore_brings_back_the_replaced_state(env: Env) -> None:
    env.define("undo", devs=DEVS)
    env.start("undo")
    env.snapfs("vm-snapshot-create", "-n", "good", "undo")
    # A definition QEMU cannot restore into: the save image is of a 32 MiB guest.
    config = store_dir(env, "undo") / "good.config.toml"
    config.chmod(0o600)
    config.write_text(config.read_text().replace('memory = "32M"', 'memory = "64M"'))
    time.sleep(0.5)
    before = env.counter("undo")
    message = env.fails("vm-snapshot-apply", "-n", "good", "undo")
    assert "brought back" in message, message
    assert env.run_state("undo") == "running"
    after = env.counter("undo")
    assert after >= before, "the guest continues from where the apply found it"
    assert ".undo.next" not in info_tags(env, "undo")
    assert_consistent(env, name="undo")
    status = json.loads(env.snapfs("domain", "status", "--json", "undo").stdout)
    assert status["current"] == "good" and "brought back" in status["last_error"]


def test_undo_is_a_snapshot_of_the_replaced_state(env: Env) -> None:
    env.define("undo2", devs=DEVS)
    env.start("undo2")
    env.snapfs("vm-snapshot-create", "-n", "early", "undo2")
    time.sleep(1.0)
    late = env.counter("undo2")
    env.snapfs("vm-snapshot-apply", "-n", "early", "undo2")
    assert env.counter("undo2") < late
    env.snapfs("vm-snapshot-apply", "-n", ".undo", "undo2", "--paused")
    assert env.counter("undo2") >= late, "applying .undo returns to the replaced state"
    assert ".undo" in info_tags(env, "undo2")
    assert_consistent(env, name="undo2")


def test_planted_symlinks_are_not_followed(env: Env) -> None:
    env.define("evil", devs=DEVS)
    env.snapfs("vm-snapshot-create", "-n", "ok", "evil")
    store = store_dir(env, "evil")
    target = env.root / "victim"
    target.write_text("precious\n")
    (store / "snapshotdata-planted.xl").symlink_to(target)
    (store / ".new.save.tmp").symlink_to(target)
    listed = {s["name"]: s for s in json.loads(env.snapfs("vm-snapshot-list", "--json", "evil").stdout)}
    assert set(listed) == {"ok", "planted"}
    assert listed["planted"]["state"] == "damaged" and "cannot read" in listed["planted"]["damage"]
    env.snapfs("vm-snapshot-delete", "-n", "planted", "evil")
    assert not (store / "snapshotdata-planted.xl").is_symlink(), "the link goes, not its target"
    env.start("evil")
    env.snapfs("vm-snapshot-create", "-n", "new", "evil")
    assert target.read_text() == "precious\n"
    assert not (store / "new.save").is_symlink()


def test_state_is_root_only(env: Env) -> None:
    env.define("secret", devs=DEVS)
    env.start("secret")
    env.snapfs("vm-snapshot-create", "-n", "s", "secret")
    store = store_dir(env, "secret")
    assert (env.state / "snapshots").stat().st_mode & 0o777 == 0o700
    assert store.stat().st_mode & 0o777 == 0o700
    for path in store.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert (store / "s.save").stat().st_mode & 0o777 == 0o400
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run([*nobody, "cat", str(store / "s.save")], capture_output=True)
    assert proc.returncode != 0 and b"Permission denied" in proc.stderr
    proc = subprocess.run([*nobody, sys.executable, "-m", "snapfs.cli", *env.dir_args,
                           "vm-snapshot-delete", "-n", "s", "secret"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 1 and "Permission denied" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s" in info_tags(env, "secret")


def test_progress_is_published_while_memory_is_saved(env: Env) -> None:
    # 512 MiB of random memory on tmpfs (background snapshots refuse a private
    # mapping of a file on a disk file system): a save long enough to watch.
    ram = Path(tempfile.mkdtemp(prefix="sfram", dir="/dev/shm")) / "ram"
    try:
        with ram.open("wb") as f:
            for _ in range(512):
                f.write(os.urandom(1 << 20))
        extra = (f'extra_args = ["-object", "memory-backend-file,id=ram0,size=512M,'
                 f'mem-path={ram},share=off", "-machine", "memory-backend=ram0"]')
        env.define("prog", memory="512M", extra=extra)
        env.start("prog")
        proc = snapfs_popen(env, "vm-snapshot-create", "-n", "watched", "prog")
        seen = []
        while proc.poll() is None:
            try:
                seen.append(json.loads((env.run / "prog.op").read_text()))
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        saving = [p for p in seen if p.get("phase") == "saving memory" and p["total"] > 0]
        assert saving, seen[-3:]
        assert all(p["operation"] == "vm-snapshot-create" for p in saving)
        done = [p["done"] for p in saving]
        assert done == sorted(done) and 0 < done[-1], done
        assert done[0] < done[-1], "progress moves while the save goes on"
        assert not (env.run / "prog.op").exists(), "no operation is shown once it is done"
        assert "watched" in info_tags(env, "prog")
    finally:
        env.kill_all()
        shutil.rmtree(ram.parent, ignore_errors=True)


def test_files_are_made_root_only_whatever_the_umask_and_no_symlink_is_followed(
        env: Env, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    dirs = ["--config-dir", str(fresh / "etc"), "--state-dir", str(fresh / "lib"),
            "--run-dir", str(fresh / "run")]
    toml = env.write_definition("um")
    proc = subprocess.run([sys.executable, "-m", "snapfs.cli", *dirs, "domain", "define",
                           str(toml)], capture_output=True, text=True,
                          preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert (fresh / "etc").stat().st_mode & 0o777 == 0o755
    assert (fresh / "etc" / "domains").stat().st_mode & 0o777 == 0o755

    # A symlink planted where QEMU writes its log: the target is left alone and
    # the log is made root-only, whatever the umask.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (fresh / "run").mkdir(mode=0o700)
    (fresh / "run" / "um.log").symlink_to(victim)
    stale = fresh / "run" / ".um.op.tmp999999999"
    stale.write_text("left by a killed process")
    proc = subprocess.run([sys.executable, "-m", "snapfs.cli", *dirs, "domain", "start", "um"],
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0))
    try:
        assert proc.returncode == 0, proc.stderr
        assert victim.read_text() == "precious\n"
        log = fresh / "run" / "um.log"
        assert not log.is_symlink() and log.stat().st_mode & 0o777 == 0o600
        subprocess.run([sys.executable, "-m", "snapfs.cli", *dirs, "vm-snapshot-create", "-n",
                        "s", "um"], check=True, capture_output=True)
        assert not stale.exists(), "recovery removes a dead process's temporaries"
    finally:
        subprocess.run([sys.executable, "-m", "snapfs.cli", *dirs, "domain", "stop", "--force",
                        "um"], capture_output=True)


def test_a_guest_qemu_stopped_on_an_error_is_crashed_with_the_reason(env: Env) -> None:
    env.define("pan", extra='extra_args = ["-device", "pvpanic", "-action", "panic=pause"]')
    env.start("pan")
    with QMP(env.qmp_path("pan")) as qmp:
        # What a panicking guest kernel does: write "panicked" to the pvpanic port.
        hmp(qmp, "o /b 0x505 1")
        assert qmp.cmd("query-status")["status"] == "guest-panicked"
    status = json.loads(env.snapfs("domain", "status", "--json", "pan").stdout)
    assert status["state"] == "crashed", status
    assert "guest-panicked" in status["reason"], status
    out = env.snapfs("domain", "status", "pan").stdout
    assert "crashed" in out and "domain start" in out, out
    env.snapfs("domain", "stop", "--force", "pan")
    status = json.loads(env.snapfs("domain", "status", "--json", "pan").stdout)
    assert status["state"] == "shutoff", "a stop is not a crash"


def test_a_damaged_snapshot_is_listed_as_such_and_can_be_deleted(env: Env) -> None:
    env.define("dmg", devs=DEVS)
    for name in ("ok", "huge", "bytes", "nan", "tagless", "shouting"):
        env.snapfs("vm-snapshot-create", "-n", name, "dmg")
    store = store_dir(env, "dmg")

    def edit(name: str, old: str, new: str) -> None:
        info = store / f"snapshotdata-{name}.xl"
        info.write_text(info.read_text().replace(old, new))

    edit("huge", 'snapshot_creationtime="', 'snapshot_creationtime="99999999999999999999')
    (store / "snapshotdata-bytes.xl").write_bytes(b'snapshot_name="bytes\xff\xfe"\n')
    edit("nan", 'snapshot_pause_ms="0.0"', 'snapshot_pause_ms="nan"')
    subprocess.run(["qemu-img", "snapshot", "-d", "tagless", str(env.images / "dmg-vdb.qcow2")],
                   check=True)
    edit("shouting", 'snapshot_parent="tagless"', 'snapshot_parent="\x1b[31mred"')

    proc = env.snapfs("vm-snapshot-list", "--json", "dmg")
    listed = {s["name"]: s for s in json.loads(proc.stdout)}
    assert set(listed) == {"ok", "huge", "bytes", "nan", "tagless", "shouting"}, "none hidden"
    assert "NaN" not in proc.stdout
    for name, why in (("huge", "not a time"), ("bytes", "cannot read"), ("nan", "out of range"),
                      ("tagless", "missing on vdb")):
        assert listed[name]["state"] == "damaged" and why in listed[name]["damage"], listed[name]
    assert listed["ok"]["state"] == listed["shouting"]["state"] == "shutoff"

    human = env.snapfs("vm-snapshot-list", "dmg").stdout
    assert "\x1b" not in human and "\\x1b[31mred" in human, human
    assert "tagless is damaged: its disk snapshot 'tagless' is missing on vdb" in human, human

    assert "not a time" in env.fails("vm-snapshot-apply", "-n", "huge", "dmg")
    for name in ("huge", "bytes", "nan", "tagless"):
        env.snapfs("vm-snapshot-delete", "-n", name, "dmg")
        assert not [p for p in store.iterdir() if p.name.startswith((name, f"snapshotdata-{name}"))]
        assert all(name not in disk_tags(env, dev, "dmg") for dev in DEVS)
    assert [s["name"] for s in json.loads(env.snapfs("vm-snapshot-list", "--json", "dmg").stdout)] \
        == ["ok", "shouting"]


def test_a_failed_undo_save_is_one_clear_line(env: Env) -> None:
    with small_state_dir(env, "64m") as small:
        env.define("undo3", devs=DEVS)
        env.start("undo3")
        env.snapfs("vm-snapshot-create", "-n", "s1", "undo3")
        size = (store_dir(env, "undo3") / "s1.save").stat().st_size
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        with (small / "filler").open("wb") as f:   # leave a quarter of a save's room
            f.write(b"\0" * (free - size // 4))
        message = env.fails("vm-snapshot-apply", "-n", "s1", "undo3")
        assert "no space left" in message.lower(), message
        assert "ExceptionGroup" not in message and "internal error" not in message
        status = json.loads(env.snapfs("domain", "status", "--json", "undo3").stdout)
        assert status["state"] == "running", status
        assert "no space left" in status["last_error"].lower(), status
        (small / "filler").unlink()
        assert_consistent(env, name="undo3")
