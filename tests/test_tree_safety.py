"""Where a tree may be mounted, what it logs into, what `df -i` says of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Env
from qmpsync import QMP, hmp
from test_tree_mount import mounted, unmount


def test_a_tree_is_not_mounted_inside_a_tree(env: Env) -> None:
    env.define("in")
    with mounted(env, name="outer") as tree:
        message = env.fails("mount", str(tree.mnt / "in"))
        assert "inside the snapfs tree mounted on" in message, message
        assert (tree.mnt / "in" / ".status").exists(), "the domain is not hidden"


def test_df_shows_no_inode_counts(env: Env) -> None:
    env.define("dfi")
    with mounted(env, name="df") as tree:
        out = subprocess.run(["df", "-i", str(tree.mnt)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[1].split()
        assert out[1:5] == ["0", "0", "0", "-"], out


def test_a_symlink_planted_at_the_tree_log_is_not_followed(env: Env, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (env.run / "mount.log").symlink_to(victim)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([sys.executable, "-m", "snapfs.cli", *env.dir_args, "mount", str(mnt)],
                          capture_output=True, text=True)
    try:
        assert proc.returncode == 1, proc.stderr
        assert "cannot open the tree's log" in proc.stderr, proc.stderr
        assert victim.read_text() == "precious\n"
        assert not mnt.is_mount()
    finally:
        unmount(mnt, lazy=True)


def test_status_of_a_crashed_domain_says_why(env: Env) -> None:
    env.define("panics", extra='extra_args = ["-device", "pvpanic", "-action", "panic=pause"]')
    env.start("panics")
    with QMP(env.qmp_path("panics")) as qmp:
        hmp(qmp, "o /b 0x505 1")
    with mounted(env, name="crash") as tree:
        status = tree.status("panics")
        assert status["state"] == "crashed", status
        assert "guest-panicked" in status["reason"], status


def test_a_damaged_snapshot_shows_in_the_tree_and_rmdir_removes_it(env: Env) -> None:
    env.define("dmgt")
    env.snapfs("vm-snapshot-create", "-n", "fine", "dmgt")
    env.snapfs("vm-snapshot-create", "-n", "broken", "dmgt")
    [info] = (env.state / "snapshots").glob("*/snapshotdata-broken.xl")
    info.write_bytes(b'snapshot_name="broken\xff"\n')
    with mounted(env, name="dmg") as tree:
        assert {"fine", "broken"} <= set(os.listdir(tree / "dmgt"))
        facts = json.loads((tree / "dmgt" / "broken" / "info.json").read_text())
        assert facts["state"] == "damaged" and "cannot read" in facts["damage"], facts
        os.rmdir(tree / "dmgt" / "broken")
        assert not info.exists()
        assert "broken" not in os.listdir(tree / "dmgt")
