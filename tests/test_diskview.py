"""Tests of snapfs.diskview against real qemu-img / qemu-nbd / libnbd (no mocks)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from snapfs.diskview import DiskView, DiskViewError, DiskViews, exported, reap_stale

pytest.importorskip("nbd", reason="python3-libnbd is needed for disk views")
for _tool in ("qemu-img", "qemu-io", "qemu-nbd"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SIZE = 5 * MiB + 1536  # not a multiple of the cluster size: EOF is exercised
IDLE = 0.3


# ---------------------------------------------------------------------------
# helpers


def sh(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stderr}"
    return res.stdout


def qemu_io(img: Path, cmd: str) -> None:
    sh("qemu-io", "-f", "qcow2", "-c", cmd, img)


def make_image(path: Path, data: bytes) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(data)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def converted_sha(img: Path, tag: str, tmp: Path) -> str:
    out = tmp / f"convert-{os.getpid()}-{random.randrange(1 << 30)}.raw"
    sh("qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={tag}",
       "-O", "raw", img, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def nbd_servers_under(path: Path) -> list[str]:
    """qemu-nbd processes whose command line mentions ``path`` (pgrep)."""
    res = subprocess.run(["pgrep", "-a", "qemu-nbd"], capture_output=True, text=True)
    return [ln for ln in res.stdout.splitlines() if str(path) in ln]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def read_all(view: DiskView, block: int) -> bytes:
    parts: list[bytes] = []
    off = 0
    while True:
        data = await view.read(off, block)
        if not data:
            return b"".join(parts)
        parts.append(data)
        off += len(data)


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def run_dir(tmp_path: Path):
    """A run dir; afterwards no qemu-nbd and no socket/record may remain."""
    rd = tmp_path / "run"
    yield rd
    deadline = time.monotonic() + 5
    while nbd_servers_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nbd_servers_under(tmp_path) == []
    nbd_dir = rd / "nbd"
    if nbd_dir.exists():
        assert sorted(os.listdir(nbd_dir)) == []


@pytest.fixture
def data() -> bytes:
    return random.Random(1234).randbytes(SIZE)


@pytest.fixture
def image(tmp_path: Path, data: bytes) -> Path:
    """qcow2 holding ``data`` at snapshot t1; its active layer is all 0xee."""
    img = make_image(tmp_path / "disk.qcow2", data)
    sh("qemu-img", "snapshot", "-c", "t1", img)
    qemu_io(img, f"write -P 0xee 0 {SIZE}")
    return img


@pytest.fixture(params=["local", "nbd"])
async def views(run_dir: Path, request: pytest.FixtureRequest):
    """Views read in-process, or (``nbd``) always through qemu-nbd."""
    v = DiskViews(run_dir, idle=IDLE, local=request.param == "local")
    try:
        yield v
    finally:
        await v.aclose()


# ---------------------------------------------------------------------------
# content


async def test_view_returns_snapshot_bytes(views: DiskViews, image: Path, data: bytes,
                                           tmp_path: Path) -> None:
    view = await views.open(image, "t1")
    try:
        assert view.size == SIZE
        got = await read_all(view, MiB)
        assert got == data
        assert hashlib.sha256(got).hexdigest() == converted_sha(image, "t1", tmp_path)
        # the active layer really is different
        assert (await view.read(0, 4)) != b"\xee" * 4
    finally:
        await views.close(view)


async def test_odd_offsets_sizes_and_eof(views: DiskViews, image: Path, data: bytes) -> None:
    async with await views.open(image, "t1") as view:
        rnd = random.Random(7)
        for _ in range(200):
            off = rnd.randrange(0, SIZE + 4096)
            n = rnd.choice([0, 1, 3, 511, 513, 4095, 65537, 131072, 1 << 20, 3 << 20])
            assert await view.read(off, n) == data[off : off + n], (off, n)
        assert await view.read(SIZE - 1, 100) == data[-1:]
        assert await view.read(SIZE - 1000, 1000) == data[-1000:]
        assert await view.read(SIZE, 10) == b""
        assert await view.read(SIZE + 12345, 10) == b""
        assert await view.read(100, 0) == b""
        assert await view.read(0, 10 * SIZE) == data
        with pytest.raises(DiskViewError) as ei:
            await view.read(-1, 10)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(DiskViewError) as ei:
        await view.read(0, 10)
    assert ei.value.errno == errno.EBADF


async def test_sequential_small_reads_and_jumps(views: DiskViews, image: Path,
                                                data: bytes) -> None:
    """FUSE-like 128 KiB sequential reads (read-ahead path), with seeks between."""
    async with await views.open(image, "t1") as view:
        assert await read_all(view, 128 * 1024) == data
        assert await read_all(view, 4096 + 17) == data
        off = 0
        for step in (1000, 70000, 131072, 131072, 5, 131072):
            assert await view.read(off, step) == data[off : off + step]
            off += step
        off = 3 * MiB + 99  # jump backwards, then read on sequentially
        for _ in range(20):
            assert await view.read(off, 131072) == data[off : off + 131072]
            off += 131072


async def test_read_larger_than_one_request(views: DiskViews, tmp_path: Path) -> None:
    """Reads over 32 MiB are split (and spread over connections)."""
    img = tmp_path / "big.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, "40M")
    qemu_io(img, "write -P 0x11 0 1M")
    qemu_io(img, "write -P 0x22 33M 1M")
    qemu_io(img, "write -P 0x33 39M 1M")
    sh("qemu-img", "snapshot", "-c", "big", img)
    qemu_io(img, "write -P 0xee 0 40M")
    async with await views.open(img, "big") as view:
        got = await view.read(0, 40 * MiB)
    expect = bytearray(40 * MiB)
    expect[0:MiB] = b"\x11" * MiB
    expect[33 * MiB : 34 * MiB] = b"\x22" * MiB
    expect[39 * MiB :] = b"\x33" * MiB
    assert got == bytes(expect)
    assert hashlib.sha256(got).hexdigest() == converted_sha(img, "big", tmp_path)


async def test_concurrent_readers(views: DiskViews, image: Path, data: bytes) -> None:
    qemu_io(image, f"write -P 0x42 0 {SIZE}")
    sh("qemu-img", "snapshot", "-c", "t2", image)
    errors: list[str] = []

    async def reader(tag: str, expect: bytes, seed: int) -> None:
        async with await views.open(image, tag) as view:
            rnd = random.Random(seed)
            for _ in range(40):
                off = rnd.randrange(0, SIZE)
                n = rnd.choice([4096, 65536, 131072, 1 << 20])
                if await view.read(off, n) != expect[off : off + n]:
                    errors.append(f"{tag} {off} {n}")
            if await read_all(view, 1 << 20) != expect:
                errors.append(f"{tag} full read")

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(reader, "t1", data, i)
        for i in range(4):
            n.start_soon(reader, "t2", b"\x42" * SIZE, 100 + i)
        await trio.sleep(0.2)
        servers = views.servers()
        # one qemu-nbd per snapshot, shared by its readers; none when read in-process
        assert len(servers) == (0 if views.local else 2)
    assert errors == []


async def test_names_needing_escapes(views: DiskViews, tmp_path: Path) -> None:
    """Commas in paths and tags, and a tag that is another snapshot's id."""
    d = tmp_path / "a,b=c"
    d.mkdir()
    img = d / "disk,1.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x01 0 1M")
    sh("qemu-img", "snapshot", "-c", "2", img)  # id 1, tag "2"
    qemu_io(img, "write -P 0x02 0 1M")
    sh("qemu-img", "snapshot", "-c", "1", img)  # id 2, tag "1"
    qemu_io(img, "write -P 0x03 0 1M")
    sh("qemu-img", "snapshot", "-c", "x,y", img)
    qemu_io(img, "write -P 0x04 0 1M")
    for tag, byte in (("1", 0x02), ("2", 0x01), ("x,y", 0x03)):
        async with await views.open(img, tag) as view:
            assert await view.read(0, MiB) == bytes([byte]) * MiB, tag


# ---------------------------------------------------------------------------
# errors


async def test_unknown_tag_is_enoent(views: DiskViews, image: Path, tmp_path: Path) -> None:
    with pytest.raises(DiskViewError) as ei:
        await views.open(image, "nosuch")
    assert ei.value.errno == errno.ENOENT
    assert "nosuch" in str(ei.value)
    with pytest.raises(DiskViewError) as ei:
        await views.open(tmp_path / "missing.qcow2", "t1")
    assert ei.value.errno == errno.ENOENT
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(DiskViewError) as ei:
        await views.open(raw, "t1")
    assert ei.value.errno == errno.EOPNOTSUPP
    assert views.servers() == []


async def test_qemu_nbd_serves_only_what_the_reader_refuses(
        run_dir: Path, tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    plain = make_image(tmp_path / "plain.qcow2", data)
    packed = tmp_path / "packed.qcow2"
    sh("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, packed)
    for img in (plain, packed):
        sh("qemu-img", "snapshot", "-c", "t", img)
        qemu_io(img, f"write -P 0xee 0 {SIZE}")
    async with DiskViews(run_dir, idle=0) as views:
        async with await views.open(plain, "t") as view:
            assert await read_all(view, MiB) == data
            assert views.servers() == [] and nbd_servers_under(tmp_path) == []
            assert exported(run_dir, plain, "t")   # a delete is refused meanwhile
            assert views.is_open(plain, "t")
        assert not exported(run_dir, plain, "t")
        with caplog.at_level(logging.INFO, logger="snapfs.diskview"):
            async with await views.open(packed, "t") as view:
                assert await read_all(view, MiB) == data
                assert [s["image"] for s in views.servers()] == [str(packed)]
                assert exported(run_dir, packed, "t")
    refused = [r.getMessage() for r in caplog.records if "served by qemu-nbd" in r.getMessage()]
    assert len(refused) == 1 and "compressed clusters" in refused[0], refused


class _NoPrecheck(DiskViews):
    """Skips the snapshot-table lookup so that qemu-nbd itself meets the bad tag."""

    async def lookup(self, image: Path, tag: str) -> dict[str, object] | None:
        return {"name": tag}


async def test_qemu_nbd_error_is_captured(run_dir: Path, image: Path) -> None:
    async with _NoPrecheck(run_dir, idle=IDLE, local=False) as views:
        with pytest.raises(DiskViewError) as ei:
            await views.open(image, "nosuch")
    assert ei.value.errno == errno.ENOENT
    assert "Can't find snapshot" in str(ei.value)


# ---------------------------------------------------------------------------
# life cycle, exported(), cleanup


def exported_elsewhere(run_dir: Path, image: Path, tag: str) -> bool:
    """exported() as seen from another process (the CLI)."""
    code = (
        "import sys; from pathlib import Path; from snapfs.diskview import exported; "
        "print(exported(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), str(image), tag],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


NBD_ONLY = pytest.mark.parametrize("views", ["nbd"], indirect=True)


@NBD_ONLY
async def test_exported_and_idle_stop(views: DiskViews, run_dir: Path, image: Path) -> None:
    assert not exported(run_dir, image, "t1")
    v1 = await views.open(image, "t1")
    v2 = await views.open(image, "t1")
    [server] = views.servers()
    pid = server["pid"]
    assert exported(run_dir, image, "t1")
    assert exported_elsewhere(run_dir, image, "t1")
    assert not exported(run_dir, image, "t2")
    assert exported(run_dir, Path(os.path.relpath(image)), "t1")  # same file, other spelling
    files = sorted(os.listdir(run_dir / "nbd"))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "sock"]
    assert (run_dir / "nbd").stat().st_mode & 0o777 == 0o700
    rec = json.loads((run_dir / "nbd" / files[0]).read_text())
    assert rec["server_pid"] == pid and rec["owner_pid"] == os.getpid()
    assert rec["tag"] == "t1" and rec["image"] == str(image) and rec["refs"] == 2

    await views.close(v1)
    await views.close(v1)  # closing twice is harmless
    assert exported(run_dir, image, "t1")
    await views.close(v2)
    # idle: not exported any more (the delete may go ahead), server still up
    assert not exported(run_dir, image, "t1")
    assert not exported_elsewhere(run_dir, image, "t1")
    assert pid_alive(pid)
    v3 = await views.open(image, "t1")  # reused within the idle time
    assert views.servers()[0]["socket"] == server["socket"]  # the same server
    assert exported(run_dir, image, "t1")
    await views.close(v3)
    await trio.sleep(IDLE + 0.5)
    assert not pid_alive(pid)
    assert views.servers() == []
    assert os.listdir(run_dir / "nbd") == []
    assert not exported(run_dir, image, "t1")


@NBD_ONLY
async def test_idle_server_not_reused_for_recreated_snapshot(
    views: DiskViews, image: Path, data: bytes
) -> None:
    """A snapshot deleted (and re-created) while its server idles is re-checked."""
    async with await views.open(image, "t1") as view:
        assert await view.read(0, 16) == data[:16]
    sock = views.servers()[0]["socket"]
    sh("qemu-img", "snapshot", "-d", "t1", image)
    qemu_io(image, "write -P 0x77 0 1M")
    sh("qemu-img", "snapshot", "-c", "t1", image)
    async with await views.open(image, "t1") as view:
        assert await view.read(0, 16) == b"\x77" * 16
        assert views.servers()[0]["socket"] != sock  # a new server
    sh("qemu-img", "snapshot", "-d", "t1", image)
    with pytest.raises(DiskViewError) as ei:
        await views.open(image, "t1")
    assert ei.value.errno == errno.ENOENT
    assert views.servers() == []


async def test_aclose_stops_open_views(run_dir: Path, image: Path) -> None:
    views = DiskViews(run_dir, idle=60, local=False)
    view = await views.open(image, "t1")
    pid = views.servers()[0]["pid"]
    await views.aclose()
    assert not pid_alive(pid)
    assert os.listdir(run_dir / "nbd") == []
    with pytest.raises(DiskViewError):
        await view.read(0, 10)
    with pytest.raises(DiskViewError):
        await views.open(image, "t1")
    await views.close(view)
    await views.aclose()


async def test_idle_zero_stops_at_once(run_dir: Path, image: Path) -> None:
    async with DiskViews(run_dir, idle=0, local=False) as views:
        async with await views.open(image, "t1") as view:
            pid = views.servers()[0]["pid"]
            await view.read(0, 10)
        assert not pid_alive(pid)
        assert os.listdir(run_dir / "nbd") == []


@NBD_ONLY
async def test_server_outlives_idle_worker_threads(
    views: DiskViews, image: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PDEATHSIG follows the forking *thread*: Trio's worker threads exit after
    10 s idle, so a server forked from one would be killed then."""
    wait = 11.0  # trio's IDLE_TIMEOUT is 10 s
    try:
        from trio._core import _thread_cache

        if hasattr(_thread_cache, "IDLE_TIMEOUT"):
            monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.2)
            wait = 1.5
    except ImportError:
        pass
    await trio.to_thread.run_sync(lambda: None)  # a worker with the short timeout
    view = await views.open(image, "t1")
    pid = views.servers()[0]["pid"]
    await view.read(0, 10)
    await trio.sleep(wait)  # every worker thread has exited by now
    assert pid_alive(pid)
    assert await view.read(0, MiB) == data[:MiB]
    await views.close(view)


@NBD_ONLY
async def test_server_death_is_eio_then_reopen_recovers(
    views: DiskViews, image: Path, data: bytes
) -> None:
    view = await views.open(image, "t1")
    [old] = views.servers()
    os.kill(old["pid"], signal.SIGKILL)
    with pytest.raises(DiskViewError) as ei:
        await view.read(0, MiB)
    assert ei.value.errno == errno.EIO
    async with await views.open(image, "t1") as again:
        assert views.servers()[0]["socket"] != old["socket"]  # pids get reused here
        assert await again.read(0, MiB) == data[:MiB]
    await views.close(view)


@NBD_ONLY
async def test_cancelled_open_leaves_nothing(views: DiskViews, image: Path,
                                             data: bytes) -> None:
    for delay in (0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.05):
        view = None
        with trio.move_on_after(delay):
            view = await views.open(image, "t1")
        if view is not None:
            assert await view.read(0, 100) == data[:100]
            await views.close(view)
        for srv in views.servers():
            assert srv["refs"] == 0
    async with await views.open(image, "t1") as view:
        assert await view.read(0, 100) == data[:100]


CHILD = """
import sys, trio
from pathlib import Path
from snapfs.diskview import DiskViews

async def main():
    views = DiskViews(Path(sys.argv[1]), idle=30, local=False)
    view = await views.open(Path(sys.argv[2]), "t1")
    print(views.servers()[0]["pid"], flush=True)
    await trio.sleep(300)

trio.run(main)
"""


async def test_owner_crash_kills_server_and_reap_cleans(run_dir: Path, image: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir), str(image)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        server = int(child.stdout.readline())
        assert pid_alive(server)
        assert exported(run_dir, image, "t1")
        child.kill()  # SIGKILL: no cleanup code runs in the owner
        child.wait()
        deadline = time.monotonic() + 5
        while pid_alive(server) and time.monotonic() < deadline:
            await trio.sleep(0.02)
        assert not pid_alive(server), "qemu-nbd outlived its owner (PDEATHSIG)"
        assert not exported(run_dir, image, "t1")
        assert any(f.endswith(".json") for f in os.listdir(run_dir / "nbd"))  # stale record
        async with DiskViews(run_dir, local=False):  # construction reaps
            assert os.listdir(run_dir / "nbd") == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_reap_stale_kills_orphaned_server(run_dir: Path, image: Path) -> None:
    """A server left running by a dead owner (no PDEATHSIG) is stopped by reap_stale."""
    nbd_dir = run_dir / "nbd"
    nbd_dir.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    sock = nbd_dir / f"{dead.pid}-0badcafe.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "--read-only", "--persistent", "--shared=0", f"--socket={sock}",
         "--load-snapshot=snapshot.name=t1", "--image-opts",
         f"driver=qcow2,file.driver=file,file.filename={image},force-share=on,read-only=on"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            await trio.sleep(0.02)
        assert sock.exists()
        (nbd_dir / f"{dead.pid}-0badcafe.json").write_text(json.dumps({
            "image": str(image), "tag": "t1", "socket": str(sock), "refs": 1,
            "server_pid": server.pid, "server_start": None,
            "owner_pid": dead.pid, "owner_start": None,
        }))
        (nbd_dir / "999999-deadbeef.sock").touch()  # a socket without a record
        assert not exported(run_dir, image, "t1")
        assert reap_stale(run_dir) >= 2
        assert server.wait(timeout=5) is not None
        assert os.listdir(nbd_dir) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---------------------------------------------------------------------------
# a running domain


def _qmp(path: Path):  # noqa: ANN202
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    f = s.makefile("rwb")
    json.loads(f.readline())  # greeting

    def cmd(_command: str, **args: object) -> object:
        f.write(json.dumps({"execute": _command, "arguments": args}).encode() + b"\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" in r:
                continue
            assert "error" not in r, r
            return r["return"]

    cmd("qmp_capabilities")
    return s, cmd


async def test_running_qemu_force_share(views: DiskViews, image: Path, data: bytes,
                                        tmp_path: Path) -> None:
    """qemu-nbd reads snapshots of an image a running QEMU holds open and writes."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    qmp_path = tmp_path / "q.qmp"
    vm = subprocess.Popen(
        [qemu, "-S", "-display", "none", "-nodefaults", "-accel", accel, "-m", "64",
         "-drive", f"file={image},if=virtio,format=qcow2",
         "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    s = None
    try:
        deadline = time.monotonic() + 20
        while not qmp_path.exists():
            assert vm.poll() is None, vm.stderr.read().decode() if vm.stderr else ""
            assert time.monotonic() < deadline
            await trio.sleep(0.05)
        s, qmp = _qmp(qmp_path)
        # the image is locked by QEMU: a plain (non force-share) open fails
        res = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert res.returncode != 0 and "lock" in res.stderr

        early = await views.open(image, "t1")
        assert await early.read(0, MiB) == data[:MiB]
        # the guest's disk is written (active layer) while the view is open
        # (HMP qemu-io prints to QEMU's stdout: snapshots "live*" show the writes)
        qmp("human-monitor-command", **{"command-line": 'qemu-io virtio0 "write -P 0x99 0 2M"'})
        qmp("blockdev-snapshot-internal-sync", device="virtio0", name="live")
        qmp("human-monitor-command", **{"command-line": 'qemu-io virtio0 "write -P 0x55 0 3M"'})

        assert await read_all(early, MiB) == data
        async with await views.open(image, "t1") as late:
            assert await read_all(late, 128 * 1024) == data
        async with await views.open(image, "live") as live:
            expect = b"\x99" * (2 * MiB) + b"\xee" * (SIZE - 2 * MiB)
            assert await read_all(live, MiB) == expect
        qmp("blockdev-snapshot-internal-sync", device="virtio0", name="live2")
        async with await views.open(image, "live2") as live2:
            assert await live2.read(0, 3 * MiB) == b"\x55" * (3 * MiB)
        qmp("blockdev-snapshot-delete-internal-sync", device="virtio0", name="live2")
        assert exported(run_dir=views.run_dir, image=image, tag="t1")
        await views.close(early)
        assert hashlib.sha256(data).hexdigest() == converted_sha(image, "t1", tmp_path)
    finally:
        if s is not None:
            s.close()
        vm.send_signal(signal.SIGKILL)
        vm.wait()
