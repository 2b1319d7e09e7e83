"""Disk views through a real mount (issue 4): ``<snapshot>/disks/<dev>.img`` and
``.disk/<tag>/<dev>.img`` (disk-only snapshots) show a disk as it was at the snapshot, read while the
domain runs and its disk keeps changing.

The module shares one mount and its guests (a boot costs seconds):

    vw    running, vda + vdb (64 MiB of random bytes)   reads under writes, EBUSY, apply, backups
    dw    running, vda holding 0x5a at 4 MiB             the issue's "done when" check
    sf    shut off, vda + vdb                            a snapshot without a save image

"The guest keeps writing" is played by ``DiskWriter``: new bytes all over a disk
through QEMU's own block layer (HMP ``qemu-io``), as the guest's writes would go.
Every check compares with ``qemu-img convert -U -l snapshot.name=TAG``, which
reads the same internal snapshot without snapfs. When the module's mount is
gone, no qemu-nbd and no socket may remain; the last test kills a mount with
SIGKILL and checks that nothing outlives it either.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pyfuse3
import pytest
from conftest import Env
from qmpsync import QMP, qemu_io
from test_tree_mount import (
    Background,
    Tree,
    assert_clean_log,
    errno_of,
    file_digests,
    mounted,
    sh,
    start_guests,
)

from snapfs.diskview import exported

pytest.importorskip("nbd", reason="python3-libnbd is needed for disk views")

MiB = 1 << 20
VDB_SIZE = 64 * MiB
CHUNK = 64 << 10


# -- helpers -------------------------------------------------------------------------


def image(env: Env, dom: str, dev: str) -> Path:
    return env.images / f"{dom}-{dev}.qcow2"


def fill_random(path: Path, size: int, seed: int) -> None:
    """Replace the qcow2 at ``path`` with one of ``size`` random bytes."""
    raw = path.with_suffix(".fill.raw")
    raw.write_bytes(random.Random(seed).randbytes(size))
    try:
        sh(f"qemu-img convert -f raw -O qcow2 {raw} {path}")
    finally:
        raw.unlink()


def sha256(path: Path, block: int = MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def converted(img: Path, tag: str | None, out: Path) -> Path:
    """``qemu-img convert -U`` of snapshot ``tag`` (or of the live disk) to a raw file."""
    snapshot = f"-l snapshot.name={tag}" if tag is not None else ""
    sh(f"qemu-img convert -U -f qcow2 {snapshot} -O raw {img} {out}")
    return out


def converted_sha(img: Path, tag: str, workdir: Path) -> str:
    out = converted(img, tag, workdir / f"convert-{tag}-{random.randrange(1 << 30)}.raw")
    try:
        return sha256(out)
    finally:
        out.unlink()


def nbd_servers(env: Env) -> list[str]:
    """qemu-nbd processes serving this module's run dir."""
    out = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(env.run) in line]


def nbd_files(env: Env) -> list[str]:
    try:
        return sorted(os.listdir(env.run / "nbd"))
    except FileNotFoundError:
        return []


def within(seconds: float, check: Callable[[], bool], what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.05)


class DiskWriter:
    """Writes new bytes all over a running domain's disk until the ``with`` block ends.

    It holds the domain's QMP monitor meanwhile (QEMU serves one client at a
    time), so snapfs verbs on that domain belong before or after the block.
    On exit the writes are flushed, so ``qemu-img -U`` sees them.
    """

    def __init__(self, env: Env, dom: str, dev: str, size: int, seed: int) -> None:
        self.qmp_path = env.qmp_path(dom)
        self.target = f"{dev}/virtio-backend"
        self.size = size
        self.rng = random.Random(seed)
        self.written: dict[int, int] = {}     # offset -> the pattern last written there
        self.count = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __enter__(self) -> DiskWriter:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the writer did not start"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        assert not self._thread.is_alive(), "the writer did not stop"
        if self.error is not None and exc is None:
            raise self.error

    def _run(self) -> None:
        try:
            with QMP(self.qmp_path) as qmp:
                while not self._stop.is_set():
                    offset = self.rng.randrange(self.size // CHUNK) * CHUNK
                    pattern = self.rng.randrange(1, 256)
                    qemu_io(qmp, self.target, f"write -P {pattern} {offset} {CHUNK}", qdev=True)
                    self.written[offset] = pattern
                    self.count += 1
                    if self.count >= 3:
                        self._ready.set()
                    time.sleep(0.002)
                qemu_io(qmp, self.target, "flush", qdev=True)
        except BaseException as err:
            self.error = err
            self._ready.set()

    def check_live(self, img: Path, workdir: Path) -> None:
        """The live disk holds every write (qemu-io over HMP hides its own failures)."""
        live = converted(img, None, workdir / "live.raw")
        try:
            with open(live, "rb") as f:
                for offset, pattern in self.written.items():
                    f.seek(offset)
                    assert f.read(CHUNK) == bytes([pattern]) * CHUNK, offset
        finally:
            live.unlink()


# -- the module's mount and guests -------------------------------------------------------


@pytest.fixture(scope="module")
def vt(module_env: Env) -> Iterator[Tree]:
    env = module_env
    env.define("vw", devs=("vda", "vdb"))
    fill_random(image(env, "vw", "vdb"), VDB_SIZE, seed=4)
    env.define("dw")
    sh(f"qemu-io -f qcow2 -c 'write -P 0x5a 4M 1M' {image(env, 'dw', 'vda')}")
    env.define("sf", devs=("vda", "vdb"))
    start_guests(env, "vw", "dw")
    with mounted(env) as tree:
        yield tree
    assert tree.proc.returncode == 0, tree.log.read_text()[-5000:]
    assert_clean_log(tree.log)
    # The mount stopped its servers on the way out.
    assert nbd_servers(env) == [] and nbd_files(env) == []


# -- bytes -----------------------------------------------------------------------------


def test_a_view_is_its_snapshot_while_the_guest_writes_on(vt: Tree, tmp_path: Path) -> None:
    env, img = vt.env, image(vt.env, "vw", "vdb")
    sh(f"mkdir {vt.mnt}/vw/busy")
    try:
        view = vt / "vw/busy/disks/vdb.img"
        st = os.stat(view)
        assert st.st_size == VDB_SIZE and st.st_mode & 0o777 == 0o400
        assert 0 < st.st_blocks <= VDB_SIZE // 512
        assert st.st_mtime == os.stat(vt / "vw/busy").st_mtime
        with DiskWriter(env, "vw", "vdb", VDB_SIZE, seed=1) as writer:
            before = writer.count
            # Several readers at once, in the block sizes tools use.
            readers = [Background(lambda: sha256(view)),
                       Background(lambda: sha256(view, block=4096)),
                       Background(lambda: sh(f"sha256sum < {view}").split()[0]),
                       Background(lambda: sha256(view, block=4 * MiB))]
            expected = converted_sha(img, "busy", tmp_path)
            digests = [r.join() for r in readers]
            during = writer.count - before
        assert digests == [expected] * len(readers)
        assert during >= 10, during       # the disk really changed under the readers
        writer.check_live(img, tmp_path)
        assert sha256(view) == expected   # and still reads the same afterwards
    finally:
        sh(f"rmdir {vt.mnt}/vw/busy")


def test_changes_are_where_two_snapshots_of_a_running_disk_differ(
        vt: Tree, tmp_path: Path) -> None:
    env, img = vt.env, image(vt.env, "vw", "vdb")
    sh(f"mkdir {vt.mnt}/vw/ch1")
    try:
        with DiskWriter(env, "vw", "vdb", VDB_SIZE, seed=7) as writer:
            while writer.count < 40:
                time.sleep(0.05)
        sh(f"mkdir {vt.mnt}/vw/ch2")
        changes = json.loads((vt / "vw/ch2/disks/vdb.changes").read_text())
        assert changes["parent"] == "ch1"
        old = converted(img, "ch1", tmp_path / "ch1.raw").read_bytes()
        new = converted(img, "ch2", tmp_path / "ch2.raw").read_bytes()
        differ = [i for i in range(0, len(new), CHUNK) if old[i:i + CHUNK] != new[i:i + CHUNK]]
        listed = [start for r in changes["ranges"]
                  for start in range(r["start"], r["start"] + r["length"], CHUNK)]
        assert listed == differ and len(differ) >= 10
        assert sha256(vt / "vw/ch2/disks/vdb.img") == hashlib.sha256(new).hexdigest()
    finally:
        for name in ("ch2", "ch1"):
            if (vt / "vw" / name).exists():
                sh(f"rmdir {vt.mnt}/vw/{name}")


def test_a_snapshot_taken_before_the_disk_was_overwritten_reads_the_old_bytes(
        vt: Tree, tmp_path: Path) -> None:
    """The issue's "done when": dw's vda held 0x5a at 4 MiB when it was snapshotted."""
    env, img = vt.env, image(vt.env, "dw", "vda")
    sh(f"mkdir {vt.mnt}/dw/before")
    try:
        with QMP(env.qmp_path("dw")) as qmp:
            qemu_io(qmp, "vda/virtio-backend", "write -P 0xa5 4M 1M", qdev=True)
            qemu_io(qmp, "vda/virtio-backend", "flush", qdev=True)
        with open(vt / "dw/before/disks/vda.img", "rb") as f:
            f.seek(4 * MiB)
            assert f.read(MiB) == b"\x5a" * MiB
        with open(converted(img, None, tmp_path / "live.raw"), "rb") as f:
            f.seek(4 * MiB)
            assert f.read(MiB) == b"\xa5" * MiB
        assert env.run_state("dw") == "running"
        counter = env.counter("dw")
        time.sleep(0.2)
        assert env.counter("dw") > counter
        assert sha256(vt / "dw/before/disks/vda.img") == converted_sha(img, "before", tmp_path)
    finally:
        sh(f"rmdir {vt.mnt}/dw/before")


def test_a_shut_off_snapshot_has_disk_views(vt: Tree, tmp_path: Path) -> None:
    env = vt.env
    vda, vdb = image(env, "sf", "vda"), image(env, "sf", "vdb")
    sh(f"qemu-io -f qcow2 -c 'write -P 0x61 1M 1M' {vdb}")
    sh(f"mkdir {vt.mnt}/sf/cold")
    try:
        sh(f"qemu-io -f qcow2 -c 'write -P 0x62 1M 1M' {vdb}")
        snap = vt / "sf/cold"
        assert sorted(os.listdir(snap)) == ["apply", "config.toml", "disks", "info.json",
                                            "snapshotdata.xl"]
        assert sorted(os.listdir(snap / "disks")) == ["vda.changes", "vda.img", "vdb.changes", "vdb.img"]
        # A VM snapshot's disks show under its own disks/ only.
        assert "cold" not in os.listdir(vt / "sf/.disk")
        assert not (vt / "sf/.disk/cold").exists()
        for dev, img in (("vda", vda), ("vdb", vdb)):
            assert sha256(snap / f"disks/{dev}.img") == converted_sha(img, "cold", tmp_path)
        with open(snap / "disks/vdb.img", "rb") as f:
            f.seek(MiB)
            assert f.read(MiB) == b"\x61" * MiB
    finally:
        sh(f"rmdir {vt.mnt}/sf/cold")


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each stretch of data, by SEEK_DATA and SEEK_HOLE."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                assert err.errno == errno.ENXIO
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            extents.append((pos, hole))
            pos = hole
    finally:
        os.close(fd)
    return extents


@pytest.mark.skipif(not hasattr(pyfuse3.Operations, "lseek"),
                    reason="pyfuse3 without contrib/pyfuse3-lseek.patch (scripts/setup)")
def test_a_view_has_the_holes_of_its_snapshot(vt: Tree, tmp_path: Path) -> None:
    img = image(vt.env, "sf", "vdb")
    sh(f"qemu-io -f qcow2 -c 'write -P 0x71 5M 192k' -c 'write -P 0x72 9M 4k' {img}")
    sh(f"mkdir {vt.mnt}/sf/holes")
    try:
        view = vt / "sf/holes/disks/vdb.img"
        data = converted(img, "holes", tmp_path / "holes.raw").read_bytes()
        extents = data_extents(view)
        # Every byte outside the extents is zero, and each 64 KiB cluster inside holds data.
        covered = bytearray(len(data))
        for start, end in extents:
            assert start % CHUNK == 0 and (end % CHUNK == 0 or end == len(data))
            covered[start:end] = data[start:end]
            assert all(data[i:i + CHUNK].strip(b"\0") for i in range(start, end, CHUNK))
        assert bytes(covered) == data
        assert (5 * MiB, 5 * MiB + 192 * 1024) in extents
        # cp and tar skip the holes and copy the bytes.
        sh(f"cp --sparse=always {view} {tmp_path}/copy.img")
        assert (tmp_path / "copy.img").read_bytes() == data
        taken = sum(end - start for start, end in extents)
        assert os.stat(tmp_path / "copy.img").st_blocks * 512 <= taken + CHUNK
    finally:
        sh(f"rmdir {vt.mnt}/sf/holes")


# -- safety ------------------------------------------------------------------------------


def test_deleting_a_snapshot_open_as_a_view_is_ebusy(vt: Tree) -> None:
    env = vt.env
    sh(f"mkdir {vt.mnt}/vw/held")
    sh(f"mkdir {vt.mnt}/vw/.disk/heldtag")
    try:
        with open(vt / "vw/held/disks/vda.img", "rb") as f:
            f.read(MiB)
            assert errno_of(os.rmdir, vt / "vw/held") == errno.EBUSY
            assert "open" in vt.status("vw")["last_error"]
            said = env.fails("vm-snapshot-delete", "-n", "held", "vw")
            assert "open as a disk view" in said, said
            assert (vt / "vw/held/disks").is_dir()
            f.read(MiB)             # still served
        with open(vt / "vw/.disk/heldtag/vdb.img", "rb") as f:
            f.read(MiB)
            assert errno_of(os.rmdir, vt / "vw/.disk/heldtag") == errno.EBUSY
            said = env.fails("disk-snapshot-delete", "-n", "heldtag", "vw")
            assert "open as a disk view" in said, said
        # Closed: both deletes go through (the server may still idle; it does not count).
        env.snapfs("vm-snapshot-delete", "-n", "held", "vw")
        os.rmdir(vt / "vw/.disk/heldtag")
    finally:
        for path in ("vw/held", "vw/.disk/heldtag"):
            if (vt / path).exists():
                os.rmdir(vt / path)
    assert not (vt / "vw/held").exists() and not (vt / "vw/.disk/heldtag").exists()


def test_applying_a_snapshot_open_as_a_view_keeps_serving_its_bytes(
        vt: Tree, tmp_path: Path) -> None:
    env, img = vt.env, image(vt.env, "vw", "vdb")
    sh(f"mkdir {vt.mnt}/vw/ap")
    try:
        with DiskWriter(env, "vw", "vdb", VDB_SIZE, seed=2):
            pass                    # the disk moves on from the snapshot
        expected = converted_sha(img, "ap", tmp_path)
        digest = hashlib.sha256()
        with open(vt / "vw/ap/disks/vdb.img", "rb") as f:
            digest.update(f.read(VDB_SIZE // 2))
            sh(f"echo running > {vt.mnt}/vw/ap/apply")
            assert env.run_state("vw") == "running"
            with DiskWriter(env, "vw", "vdb", VDB_SIZE, seed=3):
                digest.update(f.read())     # the restored domain writes meanwhile
        assert digest.hexdigest() == expected
        # What the apply replaced is a snapshot with views too.
        undo = vt.store("vw").read(".undo")
        assert sha256(vt / "vw/.undo/disks/vdb.img") == converted_sha(img, undo.disk_tag,
                                                                      tmp_path)
    finally:
        sh(f"rmdir {vt.mnt}/vw/ap")


# -- backups ---------------------------------------------------------------------------


def test_backup_tools_copy_a_snapshot_with_its_disks_byte_identical(
        vt: Tree, tmp_path: Path) -> None:
    env = vt.env
    snap = vt / "vw/bk"
    sh(f"mkdir {snap}")
    try:
        original = file_digests(snap)
        assert {"disks/vda.img", "disks/vdb.img", "save"} <= set(original)
        assert original["disks/vdb.img"] == converted_sha(image(env, "vw", "vdb"), "bk",
                                                          tmp_path)
        assert original["disks/vda.img"] == converted_sha(image(env, "vw", "vda"), "bk",
                                                          tmp_path)
        repo = {"RESTIC_REPOSITORY": str(tmp_path / "restic"), "RESTIC_PASSWORD": "x",
                "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
        restic_env = {**os.environ, **repo}
        with DiskWriter(env, "vw", "vdb", VDB_SIZE, seed=5):    # the backups run live
            sh(f"tar -C {snap.parent} -cf {tmp_path}/b.tar bk && mkdir {tmp_path}/tar && "
               f"tar -C {tmp_path}/tar -xf {tmp_path}/b.tar")
            sh(f"rsync -a -c {snap}/ {tmp_path}/rsync/")
            again = sh(f"rsync -a -c -i {snap}/ {tmp_path}/rsync/")
            sh("restic init -q", env=restic_env)
            sh(f"restic backup -q {snap}", env=restic_env)
            sh(f"restic restore latest -q --target {tmp_path}/restic-out", env=restic_env)
        assert file_digests(tmp_path / "tar/bk") == original
        assert file_digests(tmp_path / "rsync") == original
        assert again.strip() == "", again        # -c compared every byte: nothing to do
        assert file_digests(tmp_path / f"restic-out/{snap}") == original
        for copy in (tmp_path / "tar/bk", tmp_path / "rsync"):
            assert os.stat(copy / "disks/vdb.img").st_mode & 0o777 == 0o400
            assert os.stat(copy / "disks/vdb.img").st_mtime == os.stat(snap / "save").st_mtime
    finally:
        sh(f"rmdir {snap}")


# -- nothing left behind -------------------------------------------------------------------


def test_nothing_outlives_a_killed_mount(vt: Tree) -> None:
    """A view read in-process leaves only its record, which no longer holds the snapshot
    once its owner is dead; the next tree removes it."""
    env, img = vt.env, image(vt.env, "vw", "vdb")
    sh(f"mkdir {vt.mnt}/vw/crash")
    try:
        with mounted(env, name="killed") as doomed:
            pid = doomed.proc.pid
            f = open(doomed / "vw/crash/disks/vdb.img", "rb")
            try:
                f.read(MiB)
                mine = [name for name in nbd_files(env) if name.startswith(f"{pid}-")]
                assert mine and all(name.endswith(".json") for name in mine), nbd_files(env)
                assert not [line for line in nbd_servers(env) if f"/{pid}-" in line]
                assert exported(env.run, img, "crash")      # a delete is refused meanwhile
                doomed.proc.send_signal(signal.SIGKILL)
                doomed.proc.wait(10)
                assert not exported(env.run, img, "crash")
            finally:
                try:
                    f.close()
                except OSError:
                    pass        # the mount is dead
        # Its records stay until the next tree starts and reaps them.
        with mounted(env, name="reaper") as reaper:
            assert not [n for n in nbd_files(env) if n.startswith(f"{pid}-")]
            assert "vdb.img" in os.listdir(reaper / "vw/crash/disks")
        assert_clean_log(reaper.log)
    finally:
        sh(f"rmdir {vt.mnt}/vw/crash")
    # Only the module's mount may serve views now: idle servers stop within seconds.
    within(10, lambda: nbd_servers(env) == [] and nbd_files(env) == [], str(nbd_files(env)))
