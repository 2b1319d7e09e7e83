"""Load: a soak of the mounted tree, bounded in time (issue 6, item 5).

Two running domains, one mount, and threads in this process doing what users
and tools do at once, through ``os`` calls on the mount:

    cycler  (one per domain)  mkdir c-N, write apply (every third cycle apply
                              .undo as well), mkdir/rmdir a .disk tag, rmdir c-N
    reader  (READERS)         stream ``base/save`` or a disk view of ``base``
                              (``base/disks/<dev>.img``, ``.disk/dbase/<dev>.img``)
                              to its end; check its sha256
    walker  (WALKERS)         ``ls -lR``: os.walk the whole tree, lstat every
                              entry, read every small file and ``.current``

Readers read only ``base`` and ``dbase``, which no cycler removes: an rmdir of a snapshot
with an open file is EBUSY by design. A walker may meet a name a cycler has
just removed (a ``c-N``, ``.undo``, a disk tag): ENOENT there is the race any
``ls -R`` runs into, counted as ``vanished``; every other failure is an error.
(The tree reads the disks' snapshot tables with ``qemu-img info -U`` outside the
domain's lock; a read racing a rewrite can come back with zeroed entries, which
once made names of ``base`` answer ENOENT: ``images.stable_info`` reads again.)

The load stops after ``SNAPFS_SOAK_SECONDS`` (default 90) or
``SNAPFS_SOAK_CYCLES`` (default 40) cycles per domain, whichever comes first.
Then: no error anywhere (threads, ``.status``, the mount's log), the tree agrees with ``qemu-img info -U``
and the info files, the guests still count; the mount daemon holds the fds it
held after a warm-up, has no child process (its idle qemu-nbd servers have
stopped), its RSS has not grown by ``RSS_SLACK``; only the two domains' QEMUs
run and only their QMP sockets are left. The numbers are printed
(``pytest -s``); docs/reliability.md ("Load") records a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, pid_alive
from test_recovery import assert_consistent, disk_tags, info_tags
from test_tree_mount import Tree, assert_clean_log, mounted, start_guests

pytestmark = pytest.mark.skipif(not Path("/usr/bin/fusermount3").exists(),
                                reason="fuse3 not installed")

DOMS = ("soak1", "soak2")
DEVS = ("vda", "vdb")               # test_recovery's assert_consistent checks these
LOAD_SECONDS = float(os.environ.get("SNAPFS_SOAK_SECONDS", "90"))
MAX_CYCLES = int(os.environ.get("SNAPFS_SOAK_CYCLES", "40"))
READERS, WALKERS = 3, 2
MiB = 1 << 20
# glibc raises its mmap threshold each time a large block is freed: the 128 KiB
# to 1 MiB read buffers then stay in the arenas of the worker threads, and RSS
# roughly doubles in the first seconds of reading and keeps creeping (measured,
# see docs/reliability.md). A fixed threshold gives every such buffer back at
# free, so what RSS still gains is what the daemon keeps: a leak shows.
DAEMON_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
RSS_SLACK = 16 * MiB
SMALL_FILES = ("snapshotdata.xl", "info.json", "config.toml", "apply", ".status", "info")
QUIET_SECONDS = 15.0                # for idle qemu-nbd servers (2 s) and late RELEASEs


# -- the mount daemon from outside ------------------------------------------------


def fds(pid: int) -> Counter[str]:
    """What the process's fds point at (socket and pipe inodes included)."""
    found: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[os.readlink(f"/proc/{pid}/fd/{fd}")] += 1
        except FileNotFoundError:
            continue    # closed while listed
    return found


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match[1]) * 1024


def children(pid: int) -> list[str]:
    """The process's children, zombies included, as ``pid command``."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            listed = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue    # a worker thread that just ended
        for child in listed:
            try:
                kids.append(f"{child} {Path(f'/proc/{child}/comm').read_text().strip()}")
            except FileNotFoundError:
                continue
    return kids


def quiet(pid: int, expected: Counter[str] | None = None) -> Counter[str]:
    """The daemon's fds once it has no child and its fds stopped changing.

    Idle qemu-nbd servers stop 2 s after their last view closed, and the kernel
    sends RELEASE after close() has returned. With ``expected``, wait for
    exactly those fds (up to ``QUIET_SECONDS``).
    """
    deadline = time.monotonic() + QUIET_SECONDS
    last, steady = fds(pid), 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = fds(pid)
        steady = steady + 1 if now == last else 0
        last = now
        if children(pid) == [] and (now == expected if expected is not None else steady >= 5):
            break
    return last


def processes_under(root: Path) -> dict[int, list[str]]:
    """Every live process whose command line names a path under ``root``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if str(root) in argv and pid_alive(int(entry)):
            found[int(entry)] = argv.split("\0")
    return found


def sockets_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)}


def converted_sha256(img: Path, tag: str, out: Path) -> str:
    """sha256 of ``qemu-img convert -U`` of snapshot ``tag`` to a raw file."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={tag}",
                    "-O", "raw", str(img), str(out)], check=True, capture_output=True)
    try:
        return sha256_of(out)
    finally:
        out.unlink()


def sha256_of(path: Path, block: int = MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# -- the load ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A file of ``base`` a reader streams, and what it must hash to."""

    path: Path
    sha256: str
    kind: str       # "save" or "view"


class Load:
    """The threads' shared bookkeeping: operation counts, errors, the stop signal."""

    def __init__(self, tree: Tree, targets: list[Target], deadline: float) -> None:
        self.tree = tree
        self.targets = targets
        self.deadline = deadline
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.slowest: dict[str, float] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n

    @contextmanager
    def op(self, kind: str) -> Iterator[None]:
        """Count one operation of ``kind`` and keep the slowest of each kind."""
        started = time.monotonic()
        yield
        took = time.monotonic() - started
        with self._lock:
            self.counts[kind] += 1
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), took)

    def thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                body()
            except Exception:  # noqa: BLE001 -- any failure of a load thread is reported
                with self._lock:
                    self.errors.append(f"{name}: {traceback.format_exc()}")
                self.stop.set()     # one error is enough: stop and report it
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    # -- cyclers -------------------------------------------------------------

    def cycle(self, dom: str, n: int) -> None:
        """One mkdir/apply/rmdir cycle on ``dom``."""
        top = self.tree / dom
        name = f"c-{n}"
        with self.op("mkdir"):
            os.mkdir(top / name)
        with self.op("apply"):
            # A bare newline means running too: alternate the two spellings.
            (top / name / "apply").write_text("running\n" if n % 2 else "\n")
        assert os.readlink(top / ".current") == name
        if n % 3 == 2:
            with self.op("apply .undo"):
                (top / ".undo" / "apply").write_text("running\n")
        tag = f"d-{n}"
        with self.op("mkdir .disk"):
            os.mkdir(top / ".disk" / tag)
        with self.op("rmdir .disk"):
            os.rmdir(top / ".disk" / tag)
        with self.op("rmdir"):
            os.rmdir(top / name)
        status = self.tree.status(dom)
        assert status["state"] == "running" and status["last_error"] == "-", status

    def cycler(self, dom: str) -> Callable[[], None]:
        def body() -> None:
            for n in range(MAX_CYCLES):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                self.cycle(dom, n)
        return body

    # -- readers -------------------------------------------------------------

    def stream(self, target: Target, block: int) -> None:
        """Read ``target`` to its end in ``block``-sized reads; it must hash as expected."""
        digest, size = hashlib.sha256(), 0
        with self.op(f"read {target.kind}"), open(target.path, "rb", buffering=0) as f:
            while chunk := f.read(block):
                digest.update(chunk)
                size += len(chunk)
        self.add(f"{target.kind} bytes", size)
        assert digest.hexdigest() == target.sha256, (target, size, block)

    def reader(self, seed: int) -> Callable[[], None]:
        def body() -> None:
            rng = random.Random(seed)
            while not self.stop.is_set():
                kind = rng.choice(["save", "view"])
                target = rng.choice([t for t in self.targets if t.kind == kind])
                try:
                    self.stream(target, rng.choice([64 * 1024, MiB]))
                except FileNotFoundError as err:
                    self.vanished(err, target.path)
        return body

    # -- walkers -------------------------------------------------------------

    def may_vanish(self, path: Path) -> bool:
        """Whether a cycler may remove ``path`` under a walker's feet."""
        parts = path.relative_to(self.tree.mnt).parts
        if len(parts) < 2:
            return False
        entry = parts[1]
        return (entry.startswith("c-") or entry in (".undo", ".current")
                or (entry == ".disk" and len(parts) > 2 and parts[2] != "dbase"))

    def vanished(self, err: FileNotFoundError, path: Path) -> None:
        """Count an ENOENT on ``path`` that is no error of the tree's, or raise it."""
        if not self.may_vanish(path):
            raise err
        self.add("vanished")

    def visit(self, path: Path, call: Callable[[], Any], kind: str) -> None:
        try:
            with self.op(kind):
                call()
        except FileNotFoundError as err:
            self.vanished(err, path)

    def walk(self) -> None:
        """``ls -lR`` of the whole tree, reading every small file on the way."""
        trouble: list[OSError] = []
        with self.op("walk"):
            for where, dirs, files in os.walk(self.tree.mnt, onerror=trouble.append):
                self.add("list")
                for name in dirs + files:
                    path = Path(where, name)
                    self.visit(path, partial(os.lstat, path), "stat")
                    if name == ".current":
                        self.visit(path, partial(os.readlink, path), "readlink")
                    elif name in SMALL_FILES:
                        self.visit(path, path.read_bytes, "read")
        for err in trouble:
            if not isinstance(err, FileNotFoundError):
                raise err
            self.vanished(err, Path(str(err.filename)))

    def walker(self) -> Callable[[], None]:
        def body() -> None:
            while not self.stop.is_set():
                self.walk()
        return body


# -- checks ----------------------------------------------------------------------------


def assert_tree_agrees(tree: Tree) -> None:
    """The tree, the info files and ``qemu-img info -U`` tell one story."""
    env = tree.env
    for dom in DOMS:
        infos = info_tags(env, dom)
        on_disks = {dev: disk_tags(env, dev, dom) for dev in DEVS}
        assert all(tags == on_disks["vda"] for tags in on_disks.values()), on_disks
        listed = set(os.listdir(tree / dom))
        assert listed - {".status", ".current", ".disk"} == set(infos), (dom, listed, infos)
        # .disk holds the disk-only snapshots: the tags no VM snapshot (.undo too) owns.
        assert set(os.listdir(tree / dom / ".disk")) == on_disks["vda"] - set(infos.values()), \
            (dom, on_disks, infos)
        store = tree.store(dom)
        for snap, tag in infos.items():
            assert tag in on_disks["vda"], (dom, snap, tag, on_disks)
            assert (tree / dom / snap / "snapshotdata.xl").read_bytes() == \
                store.info_path(snap).read_bytes()
            facts = json.loads((tree / dom / snap / "info.json").read_text())
            assert facts["disk_tag"] == tag
            assert sorted(s["dev"] for s in facts["disk_snapshots"]) == list(DEVS)
            assert sorted(os.listdir(tree / dom / snap / "disks")) == sorted(
                f"{d}{suffix}" for d in DEVS for suffix in (".img", ".changes"))
        status = tree.status(dom)
        assert status["state"] == "running" and status["operation"] == "-", status
        assert status["last_error"] == "-", status


def guests_count(env: Env) -> None:
    for dom in DOMS:
        first = env.counter(dom)
        time.sleep(0.25)
        assert env.counter(dom) > first, f"the guest of {dom} must be running"


# -- the test ------------------------------------------------------------------------


def test_soak(env: Env) -> None:
    for dom in DOMS:
        env.define(dom, devs=DEVS)
    start_guests(env, *DOMS)
    with mounted(env, name="soak", extra_env=DAEMON_ENV) as tree:
        pid = tree.proc.pid
        targets = []
        for dom in DOMS:
            os.mkdir(tree / dom / "base")
            os.mkdir(tree / dom / ".disk/dbase")
            xl = (tree / dom / "base/snapshotdata.xl").read_text()
            save_sha = re.search(r'^snapshot_save_sha256="(.*)"$', xl, re.MULTILINE)
            assert save_sha, xl
            targets.append(Target(tree / dom / "base/save", save_sha[1], "save"))
            for dev in DEVS:
                view_sha, disk_sha = (converted_sha256(env.images / f"{dom}-{dev}.qcow2", tag,
                                                       env.root / "base.raw")
                                      for tag in ("base", "dbase"))
                targets += [Target(tree / dom / f"base/disks/{dev}.img", view_sha, "view"),
                            Target(tree / dom / f".disk/dbase/{dev}.img", disk_sha, "view")]

        # Warm-up: each kind of operation once, so that what the daemon keeps
        # for its whole life (QMP thread and loop, trio's threads) exists.
        warm = Load(tree, targets, deadline=float("inf"))
        for dom in DOMS:
            warm.cycle(dom, 2)          # n % 3 == 2: the cycle with apply .undo
        for target in targets:
            warm.stream(target, MiB)
        warm.walk()
        fds_before = quiet(pid)
        rss_before = rss(pid)

        load = Load(tree, targets, deadline=time.monotonic() + LOAD_SECONDS)
        started = time.monotonic()
        cyclers = [load.thread(f"cycler-{dom}", load.cycler(dom)) for dom in DOMS]
        others = ([load.thread(f"reader-{i}", load.reader(i)) for i in range(READERS)]
                  + [load.thread(f"walker-{i}", load.walker()) for i in range(WALKERS)])
        rss_peak = fds_peak = 0
        while any(t.is_alive() for t in cyclers):
            rss_peak = max(rss_peak, rss(pid))
            fds_peak = max(fds_peak, sum(fds(pid).values()))
            time.sleep(0.5)
        load.stop.set()
        for t in cyclers + others:
            t.join(120)
            assert not t.is_alive(), f"{t.name} is stuck"
        duration = time.monotonic() - started
        assert not load.errors, "\n".join(load.errors)

        fds_after = quiet(pid, expected=fds_before)
        rss_after = rss(pid)
        ops = sum(n for kind, n in load.counts.items()
                  if not kind.endswith("bytes") and kind != "vanished")
        print(f"\nsoak: {ops} operations in {duration:.1f}s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(load.counts.items())))
        print("soak: slowest " + ", ".join(f"{k} {v:.2f}s" for k, v in
                                           sorted(load.slowest.items())))
        print(f"soak: daemon fds {sum(fds_before.values())} -> {sum(fds_after.values())} "
              f"(peak {fds_peak}), RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB "
              f"(peak {rss_peak / MiB:.1f})")

        assert min(load.counts[k] for k in ("mkdir", "apply", "rmdir", "read save",
                                            "read view", "walk")) >= 1, load.counts
        assert children(pid) == [], "qemu-nbd servers outlived their idle time"
        assert fds_after == fds_before, (fds_after - fds_before, fds_before - fds_after)
        assert rss_after - rss_before < RSS_SLACK, (rss_before, rss_after)
        assert sockets_under(env.root) == {env.qmp_path(dom) for dom in DOMS}
        assert_tree_agrees(tree)

    assert tree.proc.returncode == 0, tree.log.read_text()[-5000:]
    assert_clean_log(tree.log)
    for dom in DOMS:
        assert_consistent(env, disk_only={"dbase"}, name=dom)
    # Each apply replaced a domain's QEMU: only the last two run, and nothing
    # else started for this test's dirs (qemu-nbd, qemu-img) is left.
    qemus = {int((env.run / f"{dom}.pid").read_text()) for dom in DOMS}
    running = processes_under(env.root)
    assert set(running) == qemus, running
    assert all("qemu-system" in argv[0] for argv in running.values()), running
    assert sockets_under(env.root) == {env.qmp_path(dom) for dom in DOMS}
    guests_count(env)
