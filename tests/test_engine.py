"""The snapshot commands on real QEMU, driven only through the CLI (issue 2).

One running two-disk domain is shared by the module (a boot costs seconds);
each test uses its own snapshot names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Env
from qmpsync import QMP, qemu_io

DOM = "web1"
MiB = 1 << 20


@pytest.fixture(scope="module")
def web1(module_env: Env) -> Env:
    module_env.define(DOM, devs=("vda", "vdb"), extra='machine = "q35"')
    module_env.start(DOM)
    return module_env


def write_disk(env: Env, dev: str, offset: int, pattern: int, name: str = DOM) -> None:
    """Have QEMU write 64 KiB of ``pattern`` at ``offset`` of a running domain's disk."""
    with QMP(env.qmp_path(name)) as qmp:
        qemu_io(qmp, f"{dev}/virtio-backend", f"write -P {pattern:#x} {offset} 64k", qdev=True)


def read_image(path: Path, offset: int, size: int = 64 << 10, snapshot: str | None = None) -> bytes:
    """Bytes of a (possibly open) qcow2 image, or of one of its internal snapshots."""
    out = path.with_suffix(".check.raw")
    args = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    subprocess.run([*args, str(path), str(out)], check=True, capture_output=True)
    try:
        with out.open("rb") as f:
            f.seek(offset)
            return f.read(size)
    finally:
        out.unlink()


def disk_file(env: Env, dev: str, name: str = DOM) -> Path:
    return env.images / f"{name}-{dev}.qcow2"


def qemu_img_tags(path: Path) -> dict[str, str]:
    """tag -> id, as ``qemu-img snapshot -l -U`` prints them."""
    out = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    tags = {}
    for line in out.splitlines()[2:]:
        fields = line.split()
        tags[fields[1]] = fields[0]
    return tags


def test_counter_goes_back_to_snapshot_time(web1: Env) -> None:
    before = web1.counter(DOM)
    web1.snapfs("vm-snapshot-create", "-n", "count1", DOM)
    after = web1.counter(DOM)
    time.sleep(1.5)
    later = web1.counter(DOM)
    assert later > after + 50, "the guest must keep counting after a live snapshot"

    web1.snapfs("vm-snapshot-apply", "-n", "count1", DOM, "--paused")
    assert web1.run_state(DOM) == "paused"
    restored = web1.counter(DOM)
    assert before <= restored <= after, (before, restored, after, later)
    time.sleep(0.5)
    assert web1.counter(DOM) == restored, "--paused must leave the vCPUs stopped"

    web1.snapfs("vm-snapshot-apply", "-n", "count1", DOM)
    assert web1.run_state(DOM) == "running"
    again = web1.counter(DOM)
    assert before <= again < later, (before, again, later)
    time.sleep(0.5)
    assert web1.counter(DOM) > again, "the restored guest runs"


def test_stop_and_save_mode_reverts_too(web1: Env) -> None:
    before = web1.counter(DOM)
    web1.snapfs("vm-snapshot-create", "-n", "paused1", "--mode", "paused", DOM)
    after = web1.counter(DOM)
    assert web1.run_state(DOM) == "running", "the domain is resumed after a save"
    time.sleep(1.0)
    web1.snapfs("vm-snapshot-apply", "-n", "paused1", DOM, "--paused")
    assert before <= web1.counter(DOM) <= after


def test_disk_bytes_written_after_the_snapshot_are_gone(web1: Env) -> None:
    vdb = disk_file(web1, "vdb")
    write_disk(web1, "vdb", 2 * MiB, 0xAA)
    web1.snapfs("vm-snapshot-create", "-n", "bytes1", DOM)
    write_disk(web1, "vdb", 2 * MiB, 0xBB)
    write_disk(web1, "vdb", 3 * MiB, 0xCC)
    web1.snapfs("disk-snapshot-create", "-n", "bytes1-later", DOM)
    assert read_image(vdb, 2 * MiB, snapshot="bytes1-later") == b"\xbb" * (64 << 10)
    assert read_image(vdb, 3 * MiB, snapshot="bytes1-later") == b"\xcc" * (64 << 10)

    web1.snapfs("vm-snapshot-apply", "-n", "bytes1", DOM)
    assert read_image(vdb, 2 * MiB) == b"\xaa" * (64 << 10)
    assert read_image(vdb, 3 * MiB) == bytes(64 << 10)


def test_two_disks_snapshot_all_or_none(web1: Env) -> None:
    with QMP(web1.qmp_path(DOM)) as qmp:
        qmp.cmd("blockdev-snapshot-internal-sync", device="vdb", name="dup")
    message = web1.fails("disk-snapshot-create", "-n", "dup", DOM)
    assert "already exists" in message and "vdb" in message
    assert "dup" not in qemu_img_tags(disk_file(web1, "vda"))

    tag = web1.snapfs("disk-snapshot-create", "-n", "both", DOM).stdout
    assert "both" in tag
    assert "both" in qemu_img_tags(disk_file(web1, "vda"))
    assert "both" in qemu_img_tags(disk_file(web1, "vdb"))


def test_lists_agree_with_qemu_img_and_info_files(web1: Env) -> None:
    web1.snapfs("vm-snapshot-create", "-n", "list1", DOM)
    web1.snapfs("disk-snapshot-create", "-n", "list-disk", DOM)
    listed = json.loads(web1.snapfs("disk-snapshot-list", "--json", DOM).stdout)
    for dev in ("vda", "vdb"):
        mine = {s["tag"]: s["id"] for s in listed if s["dev"] == dev}
        assert mine == qemu_img_tags(disk_file(web1, dev))
        assert {"list1", "list-disk"} <= set(mine)

    vms = json.loads(web1.snapfs("vm-snapshot-list", "--json", DOM).stdout)
    uuid = re.search(r'uuid = "(.*)"', (web1.config / "domains" / f"{DOM}.toml").read_text())[1]
    store = web1.state / "snapshots" / uuid
    infos = sorted(p.name[len("snapshotdata-"):-3] for p in store.glob("snapshotdata-*.xl")
                   if not p.name.startswith("snapshotdata-."))
    assert sorted(v["name"] for v in vms) == infos
    entry = next(v for v in vms if v["name"] == "list1")
    info = (store / "snapshotdata-list1.xl").read_text()
    assert info.startswith('snapshot_name="list1"\nsnapshot_creationtime="')
    assert f'snapshot_save="{store}/list1.save"' in info
    assert 'snapshot_state="running"' in info
    assert entry["save_size"] == (store / "list1.save").stat().st_size > 0
    assert (store / "list1.save").stat().st_mode & 0o777 == 0o400


def test_default_name_and_parent(web1: Env) -> None:
    web1.snapfs("vm-snapshot-create", "-n", "par1", DOM)
    t0 = int(time.time())
    out = web1.snapfs("vm-snapshot-create", DOM).stdout
    name = re.search(r"VM snapshot (\S+) ", out)[1]
    assert name.isdigit() and abs(int(name) - t0) <= 5
    vms = {v["name"]: v for v in json.loads(web1.snapfs("vm-snapshot-list", "--json", DOM).stdout)}
    assert vms[name]["parent"] == "par1"
    web1.snapfs("vm-snapshot-apply", "-n", "par1", DOM)
    web1.snapfs("vm-snapshot-create", "-n", "par2", DOM)
    vms = {v["name"]: v for v in json.loads(web1.snapfs("vm-snapshot-list", "--json", DOM).stdout)}
    assert vms["par2"]["parent"] == "par1"
    web1.snapfs("vm-snapshot-delete", "-n", name, DOM)


def test_delete_removes_disk_snapshots_and_files(web1: Env) -> None:
    web1.snapfs("vm-snapshot-create", "-n", "del1", DOM)
    web1.snapfs("vm-snapshot-delete", "-n", "del1", DOM)
    for dev in ("vda", "vdb"):
        assert "del1" not in qemu_img_tags(disk_file(web1, dev))
    assert not list(web1.state.glob("snapshots/*/*del1*"))
    assert "del1" not in web1.snapfs("vm-snapshot-list", DOM).stdout
    assert "no VM snapshot named 'del1'" in web1.fails("vm-snapshot-delete", "-n", "del1", DOM)


def test_disk_snapshot_delete_by_name_and_id(web1: Env) -> None:
    web1.snapfs("disk-snapshot-create", "-n", "dd1", DOM)
    web1.snapfs("disk-snapshot-delete", "-n", "dd1", DOM)
    assert "dd1" not in qemu_img_tags(disk_file(web1, "vda"))
    web1.snapfs("disk-snapshot-create", "-n", "dd2", DOM)
    ident = qemu_img_tags(disk_file(web1, "vda"))["dd2"]
    # test_two_disks_snapshot_all_or_none made one more snapshot on vdb: ids differ.
    vdb_tags = {i: t for t, i in qemu_img_tags(disk_file(web1, "vdb")).items()}
    if vdb_tags.get(ident, "dd2") != "dd2":
        assert "delete by name" in web1.fails("disk-snapshot-delete", "-i", ident, DOM)
        web1.snapfs("disk-snapshot-delete", "-n", "dd2", DOM)
    else:
        web1.snapfs("disk-snapshot-delete", "-i", ident, DOM)
    assert "dd2" not in qemu_img_tags(disk_file(web1, "vda"))
    assert "dd2" not in qemu_img_tags(disk_file(web1, "vdb"))
    message = web1.fails("disk-snapshot-delete", "-n", "dd2", DOM)
    assert "no disk snapshot with name 'dd2'" in message
    assert "no disk snapshot with id '999'" in web1.fails("disk-snapshot-delete", "-i", "999", DOM)
    web1.snapfs("vm-snapshot-create", "-n", "owned", DOM)
    assert "belongs to VM snapshot 'owned'" in web1.fails("disk-snapshot-delete", "-n", "owned", DOM)


def test_apply_checks_everything_before_touching_the_domain(web1: Env) -> None:
    web1.snapfs("vm-snapshot-create", "-n", "broken", DOM)
    uuid = re.search(r'uuid = "(.*)"', (web1.config / "domains" / f"{DOM}.toml").read_text())[1]
    save = web1.state / "snapshots" / uuid / "broken.save"
    pid = (web1.run / f"{DOM}.pid").read_text()
    data = save.read_bytes()
    save.chmod(0o600)
    save.write_bytes(data[: len(data) // 2])
    message = web1.fails("vm-snapshot-apply", "-n", "broken", DOM)
    assert "truncated" in message
    save.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "sha256" in web1.fails("vm-snapshot-apply", "-n", "broken", DOM)
    save.write_bytes(data)
    with QMP(web1.qmp_path(DOM)) as qmp:
        qmp.cmd("blockdev-snapshot-delete-internal-sync", device="vdb", name="broken")
    assert "disk vdb" in web1.fails("vm-snapshot-apply", "-n", "broken", DOM)
    assert (web1.run / f"{DOM}.pid").read_text() == pid, "QEMU must not have been restarted"
    assert web1.run_state(DOM) == "running"
    first = web1.counter(DOM)
    time.sleep(0.3)
    assert web1.counter(DOM) > first


def test_snapshot_name_errors(web1: Env) -> None:
    assert "empty" in web1.fails("vm-snapshot-create", "-n", "", DOM)
    assert "starts with '.'" in web1.fails("vm-snapshot-create", "-n", ".hidden", DOM)
    assert "control character" in web1.fails("vm-snapshot-create", "-n", "a\tb", DOM)
    assert "65 bytes long" in web1.fails("vm-snapshot-create", "-n", "x" * 65, DOM)
    assert "control character" in web1.fails("disk-snapshot-create", "-n", "a\nb", DOM)
    web1.snapfs("vm-snapshot-create", "-n", "taken", DOM)
    assert "already exists" in web1.fails("vm-snapshot-create", "-n", "taken", DOM)
    assert "already exists" in web1.fails("disk-snapshot-create", "-n", "taken", DOM)
    assert "no VM snapshot named 'nope'" in web1.fails("vm-snapshot-apply", "-n", "nope", DOM)
    assert "no domain named 'ghost'" in web1.fails("vm-snapshot-list", "ghost")
    assert "invalid domain name" in web1.fails("vm-snapshot-list", "../etc")
    assert "already running" in web1.fails("domain", "start", DOM)


def test_shut_off_domain_round_trip(env: Env) -> None:
    env.define("cold", devs=("vda", "vdb"))
    vdb = disk_file(env, "vdb", "cold")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 1M 64k", str(vdb)], check=True,
                   capture_output=True)
    out = env.snapfs("vm-snapshot-create", "-n", "c1", "cold").stdout
    assert "(shutoff)" in out
    subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 64k", str(vdb)], check=True,
                   capture_output=True)
    listed = json.loads(env.snapfs("vm-snapshot-list", "--json", "cold").stdout)
    assert [(v["name"], v["state"], v["save"]) for v in listed] == [("c1", "shutoff", None)]
    env.snapfs("vm-snapshot-apply", "-n", "c1", "cold")
    assert read_image(vdb, 1 * MiB) == b"\x11" * (64 << 10)
    status = json.loads(env.snapfs("domain", "status", "cold", "--json").stdout)
    assert status["state"] == "shutoff" and status["current"] == "c1"
    env.snapfs("disk-snapshot-create", "-n", "cd1", "cold")
    ident = qemu_img_tags(vdb)["cd1"]
    assert qemu_img_tags(disk_file(env, "vda", "cold"))["cd1"] == ident
    env.snapfs("disk-snapshot-delete", "-i", ident, "cold")
    assert "cd1" not in qemu_img_tags(vdb)
    env.snapfs("vm-snapshot-delete", "-n", "c1", "cold")
    left = qemu_img_tags(vdb)
    assert [t for t in left if t.startswith(".undo-")] and len(left) == 1, "only .undo is left"
    assert "not running" in env.fails("domain", "stop", "cold")


def test_domain_errors(env: Env) -> None:
    toml = env.write_definition("d1")
    env.snapfs("domain", "define", str(toml))
    assert "already defined" in env.fails("domain", "define", str(toml))

    bad = env.root / "bad.toml"
    bad.write_text('name = "d2"\nmemory = "64M"\n')
    assert "missing required key 'disks'" in env.fails("domain", "define", str(bad))
    bad.write_text('name = "d2"\n[[disks]]\ndev = "vda"\nfile = "/x"\n')
    assert "missing required key 'memory'" in env.fails("domain", "define", str(bad))
    bad.write_text('name = "d2"\nmemory = "64M"\ncpus = "two"\n[[disks]]\ndev = "vda"\nfile = "/x"\n')
    assert "'cpus' must be a int" in env.fails("domain", "define", str(bad))
    bad.write_text('name = "d2"\nmemory = [')
    assert "not valid TOML" in env.fails("domain", "define", str(bad))
    bad.write_text(f'name = "d2"\nmemory = "64M"\n[[disks]]\ndev = "vda"\nfile = "{env.root}/none.qcow2"\n')
    assert "does not exist" in env.fails("domain", "define", str(bad))
    bad.write_text('name = "d2"\nmemory = "64M"\n[[disks]]\ndev = "vda"\nfile = "/a/../etc/passwd"\n')
    assert "without '..'" in env.fails("domain", "define", str(bad))

    no_kvm = {"SNAPFS_KVM_DEVICE": str(env.root / "no-kvm")}
    kvm = env.root / "kvm.toml"
    kvm.write_text(toml.read_text().replace('name = "d1"', 'name = "k1"')
                   .replace('accel = "tcg"', 'accel = "kvm"'))
    env.snapfs("domain", "define", str(kvm))
    assert "asks for accel = \"kvm\"" in env.fails("domain", "start", "k1", env=no_kvm)

    disk_file(env, "vda", "d1").rename(env.root / "moved.qcow2")
    assert "does not exist" in env.fails("domain", "start", "d1")
    assert "not running" in env.fails("domain", "stop", "d1")


def test_raw_disk_runs_but_is_refused_for_snapshots(env: Env) -> None:
    env.define("rawdom", fmt="raw")
    assert "not qcow2" in env.fails("vm-snapshot-create", "-n", "r1", "rawdom")
    env.start("rawdom")
    assert "not qcow2" in env.fails("vm-snapshot-create", "-n", "r1", "rawdom")
    assert "not qcow2" in env.fails("disk-snapshot-create", "-n", "r1", "rawdom")
    assert env.run_state("rawdom") == "running"
    env.snapfs("domain", "stop", "rawdom", "--force")
    status = json.loads(env.snapfs("domain", "status", "rawdom", "--json").stdout)
    assert status["state"] == "shutoff"
    assert "not qcow2" in status["last_error"]


def test_operations_serialize_per_domain_across_processes(env: Env) -> None:
    import fcntl
    import sys

    env.define("one")
    env.define("two")
    lock = open(env.run / "one.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)   # as if another process were working on "one"
        env.snapfs("vm-snapshot-create", "-n", "free", "two")   # other domains go on
        waiting = subprocess.Popen([sys.executable, "-m", "snapfs.cli", *env.dir_args,
                                    "vm-snapshot-create", "-n", "queued", "one"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1.5)
        assert "queued" not in env.snapfs("vm-snapshot-list", "one").stdout
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "queued" in env.snapfs("vm-snapshot-list", "one").stdout

    racers = [subprocess.Popen([sys.executable, "-m", "snapfs.cli", *env.dir_args,
                                "vm-snapshot-create", "-n", f"race{i}", "one"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(4)]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read() if racer.stderr else ""
    tags = qemu_img_tags(disk_file(env, "vda", "one"))
    assert {f"race{i}" for i in range(4)} <= set(tags)


def traced(env: Env, trace: Path, operation: str, *args: str) -> dict[str, object]:
    """Run the CLI with ``$SNAPFS_TRACE`` and return the record of ``operation``."""
    trace.unlink(missing_ok=True)
    env.snapfs(*args, env={"SNAPFS_TRACE": str(trace)})
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    [record] = [r for r in records if r["operation"] == operation]
    assert record["error"] == ""
    return record


def test_one_qmp_session_per_create_and_one_image_read_per_disk_per_apply(
        web1: Env, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    create = traced(web1, trace, "vm-snapshot-create", "vm-snapshot-create", "-n", "once", DOM)
    counts = create["counts"]
    assert isinstance(counts, dict)
    assert counts["qmp connect"] == 1, counts
    assert "qemu-img info" not in counts, counts    # formats and tables from QEMU
    phases = [p[0] for p in create["phases"]]  # type: ignore[union-attr]
    assert "stop" in phases and "disk transaction" in phases, phases

    before = web1.counter(DOM)
    apply = traced(web1, trace, "vm-snapshot-apply", "vm-snapshot-apply", "-n", "once", DOM)
    counts = apply["counts"]
    assert isinstance(counts, dict)
    # Two disks (vda, vdb): each image's table and format are read once.
    assert counts.get("qemu-img info", 0) <= 2, counts
    assert counts["qemu-img snapshot"] == 2, counts
    assert web1.counter(DOM) < before + 1000, "the guest is back at the snapshot's count"


def test_small_operations_on_a_running_domain_read_its_tables_once_from_qemu(
        web1: Env, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    for op, args in (("disk-snapshot-create", ("-n", "small1")),
                     ("disk-snapshot-delete", ("-n", "small1"))):
        record = traced(web1, trace, op, op, *args, DOM)
        counts = record["counts"]
        assert isinstance(counts, dict)
        # One session; formats and tables from QEMU, which has the images open (asked
        # again at the end: the tables as they are now, kept for the next listing).
        assert counts["qmp connect"] == 1, counts
        assert counts["qmp query-named-block-nodes"] == 2, counts
        assert "qemu-img info" not in counts and "qemu-img snapshot" not in counts, counts
    web1.snapfs("vm-snapshot-create", "-n", "small2", DOM)
    record = traced(web1, trace, "vm-snapshot-delete", "vm-snapshot-delete", "-n", "small2", DOM)
    counts = record["counts"]
    assert isinstance(counts, dict)
    assert counts["qmp connect"] == 1 and counts["qmp query-named-block-nodes"] == 2, counts
    assert counts["qmp blockdev-snapshot-delete-internal-sync"] == 2, counts   # two disks
    assert "qemu-img info" not in counts, counts
    listed = web1.snapfs("disk-snapshot-list", "--json", DOM).stdout
    tags = [s["tag"] for s in json.loads(listed)]
    assert "small1" not in tags and "small2" not in tags
    kept = {s["tag"]: s["id"] for s in json.loads(listed) if s["dev"] == "vdb"}
    assert kept == qemu_img_tags(disk_file(web1, "vdb")), "the kept table is the image's"


def test_apply_without_undo(web1: Env) -> None:
    web1.snapfs("vm-snapshot-create", "-n", "nu1", DOM)
    web1.snapfs("vm-snapshot-apply", "-n", "nu1", DOM)
    [info] = (web1.state / "snapshots").glob("*/snapshotdata-.undo.xl")
    recorded = re.search(r'snapshot_save_sha256="(\w+)"', info.read_text())
    assert recorded, "the .undo's image is hashed while QEMU loads the snapshot"
    undo_save = info.parent / ".undo.save"
    assert hashlib.sha256(undo_save.read_bytes()).hexdigest() == recorded[1]
    time.sleep(1.5)
    before = web1.counter(DOM)
    web1.snapfs("vm-snapshot-create", "-n", "nu2", DOM)
    web1.snapfs("vm-snapshot-apply", "-n", "nu1", DOM, "--no-undo")
    assert web1.counter(DOM) < before - 50, "the guest went back to nu1"
    # The .undo of the earlier apply is not what this apply replaced: it is gone,
    # with its disk snapshots.
    assert not list((web1.state / "snapshots").glob("*/snapshotdata-.undo*.xl"))
    assert not [t for t in qemu_img_tags(disk_file(web1, "vda")) if t.startswith(".undo")]
    status = json.loads(web1.snapfs("domain", "status", DOM, "--json").stdout)
    assert status["state"] == "running" and status["current"] == "nu1"


def test_keep_undo_false_in_the_definition(env: Env) -> None:
    env.define("nokeep", extra="keep_undo = false")
    assert "keep_undo = false" in (env.config / "domains" / "nokeep.toml").read_text()
    env.start("nokeep")
    env.snapfs("vm-snapshot-create", "-n", "k1", "nokeep")
    env.snapfs("vm-snapshot-apply", "-n", "k1", "nokeep")
    assert env.run_state("nokeep") == "running"
    assert not list((env.state / "snapshots").glob("*/snapshotdata-.undo*.xl"))
    assert [t for t in qemu_img_tags(disk_file(env, "vda", "nokeep"))] == ["k1"]


def test_a_start_failure_says_what_qemu_said(env: Env) -> None:
    toml = env.write_definition("lk1")
    env.snapfs("domain", "define", str(toml))
    twin = env.root / "lk2.toml"
    twin.write_text(toml.read_text().replace('name = "lk1"', 'name = "lk2"'))
    env.snapfs("domain", "define", str(twin))
    env.start("lk1")
    message = env.fails("domain", "start", "lk2")
    assert 'Failed to get "write" lock' in message, message
    assert "exit status" not in message


def test_lineage_stays_true_through_deletes(env: Env) -> None:
    env.define("lin")

    def parents() -> dict[str, str]:
        listed = json.loads(env.snapfs("vm-snapshot-list", "--json", "lin").stdout)
        return {s["name"]: s["parent"] for s in listed}

    def current() -> str:
        return str(json.loads(env.snapfs("domain", "status", "--json", "lin").stdout)["current"])

    for name in ("a", "b", "c"):
        env.snapfs("vm-snapshot-create", "-n", name, "lin")
    assert parents() == {"a": "", "b": "a", "c": "b"}
    assert env.snapfs("vm-snapshot-list", "--tree", "lin").stdout.splitlines() == [
        "a", "|", "+- b", "    |", "    +- c"]
    env.snapfs("vm-snapshot-delete", "-n", "b", "lin")
    assert parents() == {"a": "", "c": "a"}, "a child takes its deleted parent's parent"
    assert current() == "c"
    env.snapfs("vm-snapshot-delete", "-n", "c", "lin")
    assert current() == "a", "the current one's parent becomes current"
    env.snapfs("vm-snapshot-create", "-n", "dup", "lin")
    env.snapfs("vm-snapshot-delete", "-n", "dup", "lin")
    env.snapfs("vm-snapshot-create", "-n", "dup", "lin")
    assert parents()["dup"] == "a", "a name taken again is not its own parent"
    env.snapfs("vm-snapshot-delete", "-n", "a", "lin")
    assert parents() == {"dup": ""}
    env.snapfs("vm-snapshot-delete", "-n", "dup", "lin")
    assert current() == "", "no current snapshot rather than a deleted one"


def test_names_of_digits_are_never_taken_for_ids(env: Env) -> None:
    env.define("dig", devs=("vda", "vdb"))
    vdb = disk_file(env, "vdb", "dig")

    def write(pattern: int) -> None:
        subprocess.run(["qemu-io", "-c", f"write -P {pattern:#x} 1M 64k", str(vdb)], check=True,
                       capture_output=True)

    write(0x11)
    env.snapfs("vm-snapshot-create", "-n", "first", "dig")     # qcow2 id 1
    write(0x22)
    env.snapfs("vm-snapshot-create", "-n", "1", "dig")         # named like id 1
    assert qemu_img_tags(vdb) == {"first": "1", "1": "2"}
    write(0x33)
    env.snapfs("vm-snapshot-apply", "-n", "1", "dig")
    assert read_image(vdb, 1 * MiB) == b"\x22" * (64 << 10), "snapshot '1', not id 1"
    env.snapfs("vm-snapshot-delete", "-n", "1", "dig")
    assert "first" in qemu_img_tags(vdb) and "1" not in qemu_img_tags(vdb)
    env.snapfs("vm-snapshot-apply", "-n", "first", "dig")
    assert read_image(vdb, 1 * MiB) == b"\x11" * (64 << 10)

    env.start("dig")
    env.snapfs("vm-snapshot-create", "-n", "1", "dig")   # "first" is still id 1
    assert qemu_img_tags(vdb)["first"] == "1"
    time.sleep(1)
    before = env.counter("dig")
    env.snapfs("vm-snapshot-apply", "-n", "1", "dig")
    assert env.run_state("dig") == "running"
    assert env.counter("dig") < before - 50, "back to snapshot '1', with its memory"
    env.snapfs("vm-snapshot-delete", "-n", "1", "dig")
    assert "1" not in qemu_img_tags(vdb) and "first" in qemu_img_tags(vdb)


def test_an_untouched_save_image_is_not_hashed_again(web1: Env, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    web1.snapfs("vm-snapshot-create", "-n", "hashed", DOM)
    for _ in range(2):
        apply = traced(web1, trace, "vm-snapshot-apply", "vm-snapshot-apply", "-n", "hashed",
                       DOM, "--no-undo")
        assert "sha256 of a save image" not in apply["counts"], apply["counts"]  # type: ignore[operator]
    uuid = re.search(r'uuid = "(.*)"', (web1.config / "domains" / f"{DOM}.toml").read_text())[1]
    save = web1.state / "snapshots" / uuid / "hashed.save"
    os.utime(save)     # a touch is enough to be checked again
    apply = traced(web1, trace, "vm-snapshot-apply", "vm-snapshot-apply", "-n", "hashed", DOM,
                   "--no-undo")
    assert apply["counts"]["sha256 of a save image"] == 1  # type: ignore[index]
