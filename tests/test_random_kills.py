"""SIGKILL of the CLI or the mount at uniformly random moments, and the domain still saves.

Kills at the journal's step boundaries are tested in test_recovery; here the
moment is random: during a live create, an apply or a delete of a running
domain whose memory is random (so a save takes long enough to be cut in the
middle), made by the CLI or by ``mkdir``/``rmdir``/a write to ``apply`` in a
mounted tree whose daemon is the one killed. The moment is uniform over the
operation's own duration (measured on its last uninterrupted run). After every
kill the next live create of the same domain must succeed, the guest must run,
and the info files must match the disks' snapshot tables (``qemu-img info -U``).

``SNAPFS_KILLS`` (default 40) kills are made, within ``SNAPFS_KILL_SECONDS``
(default 420). With ``SNAPFS_KILL_REPORT=FILE`` the counts are written there
(docs/reliability.md reports a longer run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Env
from test_recovery import assert_consistent, info_tags
from test_tree_mount import unmount, wait_mounted

DOM = "rec"
KILLS = int(os.environ.get("SNAPFS_KILLS", "40"))
BOUND = float(os.environ.get("SNAPFS_KILL_SECONDS", "420"))


@pytest.fixture
def busy(env: Env) -> Env:
    ram = Path("/dev/shm") / f"snapfs-kills-{os.getpid()}"
    with ram.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    extra = (f'extra_args = ["-object", "memory-backend-file,id=ram0,size=128M,'
             f'mem-path={ram},share=off", "-machine", "memory-backend=ram0"]')
    env.define(DOM, devs=("vda", "vdb"), memory="128M", extra=extra)
    env.start(DOM)
    try:
        yield env
    finally:
        ram.unlink(missing_ok=True)


def _cli(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "snapfs.cli", *env.dir_args, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Mount:
    """A mounted tree that can be killed and mounted again."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.mnt = env.root / "mnt"
        self.mnt.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        unmount(self.mnt, lazy=True)
        log = self.env.root / "mount.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "snapfs.cli", *self.env.dir_args,
                                          "mount", "--foreground", str(self.mnt)],
                                         stdout=out, stderr=out)
        wait_mounted(self.mnt, self.proc, log)

    def verb(self, op: str, snap: str) -> subprocess.Popen[str]:
        """The operation as a shell does it in the tree."""
        where = self.mnt / DOM
        command = {"create": f"mkdir {where}/{snap}", "delete": f"rmdir {where}/{snap}",
                   "apply": f"echo running > {where}/{snap}/apply"}[op]
        return subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        unmount(self.mnt, lazy=True)

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        unmount(self.mnt, lazy=True)


def test_random_kills_leave_a_domain_that_saves(busy: Env) -> None:
    env = busy
    rng = random.Random(int(os.environ.get("SNAPFS_KILL_SEED", "7")))
    counts: Counter[str] = Counter()
    took: dict[tuple[str, str], float] = {}     # (via, op) -> seconds, last whole run
    env.snapfs("vm-snapshot-create", "-n", "base", DOM)
    mount = Mount(env)
    started = time.monotonic()
    kills = n = 0
    try:
        while kills < KILLS and time.monotonic() - started < BOUND:
            n += 1
            snaps = [s for s in info_tags(env) if s not in (".undo", "base")]
            op = rng.choice(["create", "apply", "delete"] if snaps else ["create"])
            via = rng.choice(["cli", "cli", "cli", "mount"])
            snap = {"create": f"k{n}", "apply": rng.choice(snaps + ["base"]),
                    "delete": rng.choice(snaps or ["base"])}[op]
            if via == "mount":
                mount.up()
                proc = mount.verb(op, snap)
            else:
                proc = _cli(env, *{"create": ["vm-snapshot-create", "-n", snap, DOM],
                                   "apply": ["vm-snapshot-apply", "-n", snap, DOM],
                                   "delete": ["vm-snapshot-delete", "-n", snap, DOM]}[op])
            # The first run of each kind is timed whole; then the kill falls anywhere in it.
            span = took.get((via, op))
            delay = rng.uniform(0, 1.1 * span) if span else 60.0
            begun = time.monotonic()
            try:
                proc.wait(timeout=delay)
                took[(via, op)] = time.monotonic() - begun
                counts[f"{op} by {via}: finished before the kill"] += 1
                assert proc.returncode == 0, (via, op, snap, proc.communicate())
            except subprocess.TimeoutExpired:
                if via == "mount":
                    mount.kill()
                else:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                counts[f"{op} by {via}: killed"] += 1
            finally:
                proc.communicate()

            after = env.snapfs("vm-snapshot-create", "-n", f"after{n}", DOM, check=False)
            log = (env.run / f"{DOM}.log").read_text(errors="replace")[-2000:]
            assert after.returncode == 0, (n, via, op, delay, after.stderr, counts, log)
            listed = json.loads(env.snapfs("vm-snapshot-list", "--json", DOM).stdout)
            mode = {s["name"]: s["mode"] for s in listed}[f"after{n}"]
            counts[f"create after a kill saved {mode}"] += 1
            status = json.loads(env.snapfs("domain", "status", "--json", DOM).stdout)
            assert status["state"] == "running", (n, via, op, delay, status)
            assert_consistent(env)
            # Keep the table short: an image with hundreds of snapshots slows every step.
            for old in [s for s in info_tags(env) if s not in (".undo", "base")][:-3]:
                env.snapfs("vm-snapshot-delete", "-n", old, DOM)
    finally:
        mount.down()

    report = os.environ.get("SNAPFS_KILL_REPORT")
    if report:
        Path(report).write_text(json.dumps({"kills": kills, "rounds": n,
                                            "seconds": round(time.monotonic() - started),
                                            "counts": dict(sorted(counts.items()))},
                                           indent=2) + "\n")
    assert kills >= KILLS, (kills, counts)
    assert counts["create after a kill saved live"] == n, counts
