"""A snapfs process killed at any step of any operation loses nothing (issue 6).

For each step, the CLI is run with SNAPFS_DIE_AT=<operation>:<step> and SIGKILLs
itself there; the next command finishes or rolls the operation back. Then the
domain must be in the run state it had, the store must agree with the disks,
and no half snapshot may be visible.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Env

DOM = "rec"
DEVS = ("vda", "vdb")

CREATE_STEPS = ["stop", "transaction", "migrate", "resume", "record", "current"]
APPLY_STEPS = (["undo"] + [f"undo:{s}" for s in CREATE_STEPS]
               + ["quit", "revert", "restore", "keep-undo", "rename-undo", "current"])


@pytest.fixture(scope="module")
def rec(module_env: Env) -> Env:
    module_env.define(DOM, devs=DEVS)
    module_env.start(DOM)
    module_env.snapfs("vm-snapshot-create", "-n", "base", DOM)
    return module_env


def die_at(env: Env, step: str, *args: str) -> None:
    proc = env.snapfs(*args, check=False, env={"SNAPFS_DIE_AT": step})
    assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, proc.stderr)


def store_dir(env: Env, name: str = DOM) -> Path:
    uuid = re.search(r'uuid = "(.*)"', (env.config / "domains" / f"{name}.toml").read_text())[1]
    return env.state / "snapshots" / uuid


def disk_tags(env: Env, dev: str, name: str = DOM) -> set[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                          str(env.images / f"{name}-{dev}.qcow2")],
                         check=True, capture_output=True, text=True).stdout
    return {s["name"] for s in json.loads(out).get("snapshots", [])}


def info_tags(env: Env, name: str = DOM) -> dict[str, str]:
    """snapshot name -> disk tag, from the info files."""
    result = {}
    for path in store_dir(env, name).glob("snapshotdata-*.xl"):
        text = path.read_text()
        snap = re.search(r'^snapshot_name="(.*)"$', text, re.M)[1]
        result[snap] = re.search(r'^snapshot_disk_tag="(.*)"$', text, re.M)[1]
    return result


def assert_consistent(env: Env, disk_only: set[str] = frozenset(), name: str = DOM) -> None:
    """Every VM snapshot has its tag on every disk and its files; nothing else is left."""
    infos = info_tags(env, name)
    assert ".undo.next" not in infos
    for dev in DEVS:
        tags = disk_tags(env, dev, name)
        assert set(infos.values()) <= tags, (dev, infos, tags)
        assert tags - set(infos.values()) <= set(disk_only), (dev, tags, infos)
    listed = {s["name"] for s in json.loads(env.snapfs("vm-snapshot-list", "--json", name).stdout)}
    assert listed == set(infos) - {".undo"}
    files = {p.name for p in store_dir(env, name).iterdir()}
    assert not [f for f in files if f.endswith(".tmp") or ".undo.next" in f], files
    for snap in infos:
        assert f"{snap}.config.toml" in files
    assert not (env.state / "journal" / f"{name}.json").exists()


def assert_running(env: Env, name: str = DOM) -> None:
    status = json.loads(env.snapfs("domain", "status", "--json", name).stdout)
    assert status["state"] == "running", status
    first = env.counter(name)
    time.sleep(0.25)
    assert env.counter(name) > first, "the guest must be running"


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_killed(rec: Env, step: str) -> None:
    name = f"c-{step}"
    die_at(rec, f"vm-snapshot-create:{step}", "vm-snapshot-create", "-n", name, DOM)
    assert_running(rec)           # `domain status` recovers the journal first
    assert_consistent(rec)
    listed = {s["name"] for s in json.loads(rec.snapfs("vm-snapshot-list", "--json", DOM).stdout)}
    assert (name in listed) == (step == "current"), "only a recorded snapshot survives"
    if name in listed:
        rec.snapfs("vm-snapshot-delete", "-n", name, DOM)


@pytest.mark.parametrize("step", APPLY_STEPS)
def test_apply_killed(rec: Env, step: str) -> None:
    die_at(rec, f"vm-snapshot-apply:{step}", "vm-snapshot-apply", "-n", "base", DOM)
    assert_running(rec)
    assert_consistent(rec)
    status = json.loads(rec.snapfs("domain", "status", "--json", DOM).stdout)
    if step in ("quit", "revert", "restore", "keep-undo", "rename-undo", "current"):
        assert status["current"] == "base", "an apply past quit is finished"
        assert ".undo" in info_tags(rec)


@pytest.mark.parametrize("step", ["reparent", "forget"])
def test_delete_killed(rec: Env, step: str) -> None:
    rec.snapfs("vm-snapshot-create", "-n", f"d1{step}", DOM)
    rec.snapfs("vm-snapshot-create", "-n", f"d2{step}", DOM)
    parent = json.loads(rec.snapfs("vm-snapshot-list", "--json", DOM).stdout)
    parent_of_d1 = {s["name"]: s["parent"] for s in parent}[f"d1{step}"]
    die_at(rec, f"vm-snapshot-delete:{step}", "vm-snapshot-delete", "-n", f"d1{step}", DOM)
    assert_running(rec)
    assert_consistent(rec)
    assert f"d1{step}" not in info_tags(rec)
    assert all(f"d1{step}" not in disk_tags(rec, dev) for dev in DEVS)
    listed = {s["name"]: s["parent"] for s in
              json.loads(rec.snapfs("vm-snapshot-list", "--json", DOM).stdout)}
    assert listed[f"d2{step}"] == parent_of_d1, "the child took the deleted one's parent"


def test_disk_snapshot_create_and_delete_killed(rec: Env) -> None:
    die_at(rec, "disk-snapshot-create:snapshot", "disk-snapshot-create", "-n", "k1", DOM)
    assert_running(rec)
    assert all("k1" not in disk_tags(rec, dev) for dev in DEVS), "rolled back"
    rec.snapfs("disk-snapshot-create", "-n", "k2", DOM)
    die_at(rec, "disk-snapshot-delete:delete", "disk-snapshot-delete", "-n", "k2", DOM)
    rec.snapfs("disk-snapshot-list", DOM)
    assert all("k2" not in disk_tags(rec, dev) for dev in DEVS), "finished"
    assert_consistent(rec)


@pytest.mark.parametrize("step", ["disks", "record", "current"])
def test_shut_off_create_killed(env: Env, step: str) -> None:
    env.define("off", devs=DEVS)
    die_at(env, f"vm-snapshot-create:{step}", "vm-snapshot-create", "-n", "s", "off")
    listed = {s["name"] for s in json.loads(env.snapfs("vm-snapshot-list", "--json", "off").stdout)}
    assert (listed == {"s"}) == (step == "current")
    assert_consistent(env, name="off")


def test_a_mount_recovers_before_serving(rec: Env) -> None:
    from test_tree_mount import mounted

    die_at(rec, "vm-snapshot-create:migrate", "vm-snapshot-create", "-n", "at-mount", DOM)
    assert (rec.state / "journal" / f"{DOM}.json").exists()
    with mounted(rec, name="rec") as tree:
        # The first request is answered once serving starts, after recovery.
        assert "base" in os.listdir(tree / DOM)
        assert not (rec.state / "journal" / f"{DOM}.json").exists()
        assert "at-mount" not in os.listdir(tree / DOM)
        assert rec.run_state(DOM) == "running"
    assert_consistent(rec)
