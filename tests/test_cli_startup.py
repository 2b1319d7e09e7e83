"""The read-only commands answer from files, without trio and the engine, and say
the same as the engine would (no QEMU: a shut-off domain; `domain status` of a
running one goes the same way and is covered by the QEMU tests).

What a command costs to start is measured by ``bench/run``; here, what it imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import Env

DOM = "quick"
# What only the engine needs: none of it may be imported to list or show status.
HEAVY = ("trio", "asyncio", "qemu", "snapfs.engine", "snapfs.qmp", "snapfs.vm",
         "snapfs.catalog", "snapfs.diskview", "snapfs.saves", "hashlib")


def imported(env: Env, *args: str) -> tuple[set[str], str]:
    """The modules ``snapfs ARGS`` imported (``-X importtime``), and what it printed."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapfs.cli",
                           *env.dir_args, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return names, proc.stdout


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


@pytest.fixture
def quick(env: Env) -> Env:
    env.define(DOM, devs=("vda", "vdb"))
    env.snapfs("vm-snapshot-create", "-n", "s1", DOM)
    env.snapfs("disk-snapshot-create", "-n", "d1", DOM)
    # Images as they are most of the time: last written a while ago.
    past = time.time() - 60
    for image in env.images.glob(f"{DOM}-*.qcow2"):
        os.utime(image, (past, past))
    return env


def test_lists_and_status_import_neither_trio_nor_the_engine(quick: Env) -> None:
    # The first listing reads the disk tables with qemu-img and keeps them in the run dir.
    first = quick.snapfs("vm-snapshot-list", "--json", DOM).stdout
    for args in (["vm-snapshot-list", "--json", DOM], ["disk-snapshot-list", "--json", DOM],
                 ["domain", "list", "--json"], ["domain", "status", DOM], ["--help"]):
        names, out = imported(quick, *args)
        assert "snapfs.config" in names
        assert not heavy(names), (args, heavy(names))
    names, out = imported(quick, "vm-snapshot-list", "--json", DOM)
    assert out == first
    listed = json.loads(out)
    assert [(s["name"], s["state"]) for s in listed] == [("s1", "shutoff")]
    names, out = imported(quick, "disk-snapshot-list", "--json", DOM)
    assert [(s["dev"], s["tag"]) for s in json.loads(out)] == [
        ("vda", "s1"), ("vda", "d1"), ("vdb", "s1"), ("vdb", "d1")]
    names, out = imported(quick, "domain", "status", "--json", DOM)
    assert json.loads(out)["state"] == "shutoff" and json.loads(out)["current"] == "s1"


def test_what_another_tool_changed_is_listed(quick: Env) -> None:
    quick.snapfs("disk-snapshot-list", DOM)
    vdb = quick.images / f"{DOM}-vdb.qcow2"
    subprocess.run(["qemu-img", "snapshot", "-d", "s1", str(vdb)], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "outside", str(vdb)], check=True)
    tags = {(s["dev"], s["tag"]) for s in json.loads(
        quick.snapfs("disk-snapshot-list", "--json", DOM).stdout)}
    assert ("vdb", "outside") in tags and ("vdb", "s1") not in tags
    [s1] = json.loads(quick.snapfs("vm-snapshot-list", "--json", DOM).stdout)
    assert s1["state"] == "damaged" and "vdb" in s1["damage"]


def test_a_journal_left_behind_is_recovered_first(quick: Env) -> None:
    quick.snapfs("vm-snapshot-list", DOM)
    killed = quick.snapfs("disk-snapshot-create", "-n", "k1", DOM, check=False,
                          env={"SNAPFS_DIE_AT": "disk-snapshot-create:snapshot"})
    assert killed.returncode == -9
    journal = quick.state / "journal" / f"{DOM}.json"
    assert journal.exists()
    names, out = imported(quick, "vm-snapshot-list", DOM)
    assert "trio" in names, "only the engine recovers"
    assert not journal.exists()
    status = json.loads(quick.snapfs("domain", "status", "--json", DOM).stdout)
    assert "interrupted disk-snapshot-create" in status["last_error"]


@pytest.mark.parametrize("written", [
    "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "6BA7B810-9DAD-11D1-80B4-00C04FD430C8",
    "{6ba7b810-9dad-11d1-80b4-00c04fd430c8}", "6ba7b8109dad11d180b400c04fd430c8"])
def test_a_uuid_in_any_form_is_read_canonical(written: str) -> None:
    from snapfs.config import parse_domain
    definition = parse_domain(f'name = "u"\nuuid = "{written}"\nmemory = "16M"\n'
                              '[[disks]]\ndev = "vda"\nfile = "/x.qcow2"\n')
    assert definition.uuid == "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def test_a_bad_uuid_is_refused() -> None:
    from snapfs.config import parse_domain
    from snapfs.errors import ConfigError
    with pytest.raises(ConfigError, match="'uuid'"):
        parse_domain('name = "u"\nuuid = "6ba7b810-9dad-11d1-80b4-00c04fd430cz"\n'
                     'memory = "16M"\n[[disks]]\ndev = "vda"\nfile = "/x.qcow2"\n')
