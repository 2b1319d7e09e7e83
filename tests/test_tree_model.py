"""The tree's handlers over the real engine (no mount): names, attributes, verbs, errnos.

Domains here stay shut off, so a snapshot is a qemu-img call and no guest
boots; ``test_tree_unit.py`` covers every path and errno over a fake engine,
``test_tree_mount.py`` goes through a real mount with running guests. Every
test fails if snapfs logs an error it did not expect.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio
from conftest import Env
from test_tree_unit import fails, listdir, mkdir, read_file, rmdir, walk

from snapfs.config import Dirs
from snapfs.diskview import DiskViews
from snapfs.engine import Engine
from snapfs.ops import model
from snapfs.ops.fs import Operations
from snapfs.ops.model import Tree

ROOT = pyfuse3.ROOT_INODE
DOM = "m1"


@pytest.fixture(scope="module")
def domains(module_env: Env) -> Env:
    module_env.define(DOM, devs=("vda", "vdb"))
    module_env.define("mraw", fmt="raw")
    return module_env


@pytest.fixture
def engine(domains: Env) -> Engine:
    return Engine(Dirs(domains.config, domains.state, domains.run))


@pytest.fixture
def ops(engine: Engine) -> Operations:
    return Operations(Tree(engine))


@pytest.fixture
def allow_errors() -> None:
    """A test that requests this may log errors (it provokes them)."""


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture,
                         request: pytest.FixtureRequest) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="snapfs")
    yield
    if "allow_errors" not in request.fixturenames:
        errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]


async def status(ops: Operations, dom: str = DOM) -> dict[str, str]:
    text = (await read_file(ops, f"{dom}/.status")).decode()
    return dict(line.split(": ", 1) for line in text.splitlines())


# -- the shape of the tree ---------------------------------------------------


async def test_a_snapshot_directory_holds_its_files_with_honest_attributes(
        ops: Operations, engine: Engine, domains: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    root = await listdir(ops, "", monkeypatch)
    assert {DOM, "mraw"} <= set(root)
    before = await listdir(ops, DOM, monkeypatch)
    assert {".status", ".disk"} <= set(before)
    assert all(not n.startswith(".") or n in (".status", ".disk", ".current", ".undo")
               for n in before)

    entry = await mkdir(ops, DOM, "shape")
    try:
        snap = await engine.snapshot(DOM, "shape")
        assert stat.S_ISDIR(entry.st_mode) and stat.S_IMODE(entry.st_mode) == 0o555
        assert entry.st_mtime_ns == snap.creation_time * 10**9
        files = await listdir(ops, f"{DOM}/shape", monkeypatch)
        # Shut off: a disk-only snapshot, so no save image.
        assert list(files) == ["snapshotdata.xl", "info.json", "config.toml", "disks", "apply"]
        disks = files.pop("disks")
        assert stat.S_ISDIR(disks.st_mode) and stat.S_IMODE(disks.st_mode) == 0o555
        assert disks.st_mtime_ns == snap.creation_time * 10**9
        assert (await walk(ops, f"{DOM}/shape")).st_nlink == 3
        for name, attr in files.items():
            mode = stat.S_IMODE(attr.st_mode)
            assert stat.S_ISREG(attr.st_mode) and attr.st_nlink == 1
            assert mode == (0o200 if name == "apply" else 0o444), name
            assert attr.st_mtime_ns == snap.creation_time * 10**9
            data = await read_file(ops, f"{DOM}/shape/{name}")
            assert attr.st_size == len(data), name
            assert attr.st_blocks == (len(data) + 511) // 512
        xl = await read_file(ops, f"{DOM}/shape/snapshotdata.xl")
        assert xl.startswith(b'snapshot_name="shape"\n')
        assert b'snapshot_disks="vda,vdb"' in xl
        config = await read_file(ops, f"{DOM}/shape/config.toml")
        stored = domains.state / "snapshots" / engine.domain(DOM).uuid / "shape.config.toml"
        assert config == stored.read_bytes()
        info = (await read_file(ops, f"{DOM}/shape/info.json")).decode()
        assert '"name": "shape"' in info and '"dev": "vdb"' in info
        assert await read_file(ops, f"{DOM}/shape/apply") == b""

        dom = await walk(ops, DOM)
        after = await listdir(ops, DOM, monkeypatch)
        subdirs = [n for n, a in after.items() if stat.S_ISDIR(a.st_mode)]
        assert dom.st_nlink == 2 + len(subdirs)
        assert stat.S_IMODE(dom.st_mode) == 0o755
        assert os.fsdecode(await ops.readlink(after[".current"].st_ino)) == "shape"
        assert stat.S_ISLNK(after[".current"].st_mode)
        assert (await status(ops))["current"] == "shape"
    finally:
        await rmdir(ops, DOM, "shape")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/shape"))


async def test_names_that_are_not_there_are_enoent(ops: Operations) -> None:
    await fails(errno.ENOENT, walk(ops, "nosuchdomain"))
    await fails(errno.ENOENT, walk(ops, f"{DOM}/nosuchsnapshot"))
    await fails(errno.ENOENT, walk(ops, f"{DOM}/.nothing"))
    await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/nosuchtag"))
    await fails(errno.ENOENT, ops.lookup(ROOT, b"\xff\xfe", None))
    await fails(errno.ENOENT, ops.lookup((await walk(ops, DOM)).st_ino, b"x" * 300, None))
    await fails(errno.ENOENT, ops.getattr(999_999, None))


# -- verbs and their errnos -------------------------------------------------------


@pytest.mark.parametrize("name, errnum", [
    (b".hidden", errno.EINVAL),
    (b"a\x01b", errno.EINVAL),
    (b"tab\there", errno.EINVAL),
    (b"\xff\xfe", errno.EINVAL),
    (b"x" * 65, errno.ENAMETOOLONG),
    (b"x" * 1024, errno.ENAMETOOLONG),
    ("é".encode() * 33, errno.ENAMETOOLONG),   # 33 characters, 66 bytes
], ids=["dot", "control", "tab", "not-utf8", "65-bytes", "1024-bytes", "66-bytes-utf8"])
async def test_bad_snapshot_names_are_refused_and_reported(
        ops: Operations, name: bytes, errnum: int) -> None:
    for parent in (DOM, f"{DOM}/.disk"):
        await fails(errnum, ops.mkdir((await walk(ops, parent)).st_ino, name, 0o755, None))
        # A file manager probing `.Trash-0` must not bury a real failure.
        assert "mkdir" not in (await status(ops))["last_error"]


async def test_a_64_byte_name_is_fine_and_a_taken_one_is_eexist(ops: Operations) -> None:
    name = "x" * 64
    await mkdir(ops, DOM, name)
    try:
        await fails(errno.EEXIST, mkdir(ops, DOM, name))
        assert "already exists" in (await status(ops))["last_error"]
    finally:
        await rmdir(ops, DOM, name)


async def test_a_disk_that_is_not_qcow2_is_eopnotsupp(ops: Operations) -> None:
    await fails(errno.EOPNOTSUPP, mkdir(ops, "mraw", "s"))
    assert "not qcow2" in (await status(ops, "mraw"))["last_error"]


async def test_every_other_change_is_erofs(ops: Operations) -> None:
    await mkdir(ops, DOM, "ro")
    try:
        dom = (await walk(ops, DOM)).st_ino
        snap = (await walk(ops, f"{DOM}/ro")).st_ino
        info = (await walk(ops, f"{DOM}/ro/info.json")).st_ino
        fields = SimpleNamespace(update_mode=True, update_uid=False, update_gid=False,
                                 update_size=False, update_atime=False, update_mtime=False)
        attr = SimpleNamespace(st_mode=0o777, st_size=0)
        refused = [
            ops.create(snap, b"new", 0o644, os.O_WRONLY, None),
            ops.create(dom, b"new", 0o644, os.O_WRONLY, None),
            ops.mknod(snap, b"fifo", stat.S_IFIFO | 0o644, 0, None),
            ops.symlink(dom, b"link", b"ro", None),
            ops.link(info, snap, b"hard", None),
            ops.unlink(snap, b"info.json", None),
            ops.unlink(dom, b".status", None),
            ops.rename(dom, b"ro", dom, b"renamed", 0, None),
            ops.rename(snap, b"info.json", snap, b"x.json", 0, None),
            ops.setattr(info, attr, fields, None, None),
            ops.setattr(info, SimpleNamespace(st_size=3), SimpleNamespace(
                **{**vars(fields), "update_mode": False, "update_size": True}), None, None),
            ops.setattr(info, attr, SimpleNamespace(
                **{**vars(fields), "update_mode": False, "update_size": True}), None, None),
            ops.open(info, os.O_WRONLY, None),
            ops.open(info, os.O_RDONLY | os.O_TRUNC, None),
            ops.mkdir(snap, b"sub", 0o755, None),
            ops.mkdir(ROOT, b"newdomain", 0o755, None),
            ops.rmdir(dom, b".disk", None),
        ]
        for call in refused:
            await fails(errno.EROFS, call)
        assert "read-only" not in (await status(ops))["last_error"], "refusals are not news"
        # Truncating apply is what `echo running > apply` may ask first: allowed.
        apply = (await walk(ops, f"{DOM}/ro/apply")).st_ino
        await ops.setattr(apply, attr, SimpleNamespace(
            **{**vars(fields), "update_mode": False, "update_size": True}), None, None)
    finally:
        await rmdir(ops, DOM, "ro")


async def test_rmdir_waits_for_open_files_then_is_ebusy(
        ops: Operations, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "RELEASE_GRACE", 0.2)
    await mkdir(ops, DOM, "busy")
    info = await ops.open((await walk(ops, f"{DOM}/busy/info.json")).st_ino, os.O_RDONLY, None)
    await fails(errno.EBUSY, rmdir(ops, DOM, "busy"))
    assert "open" in (await status(ops))["last_error"]
    assert await engine.snapshot(DOM, "busy")

    # A release that arrives while rmdir waits (close() returns before RELEASE) lets it through.
    async def release_soon() -> None:
        await trio.sleep(0.05)
        await ops.release(info.fh)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_soon)
        await rmdir(ops, DOM, "busy")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/busy"))


async def test_unknown_snapshot_rmdir_is_enoent(ops: Operations) -> None:
    await fails(errno.ENOENT, rmdir(ops, DOM, "nosuch"))


async def test_disk_snapshots_in_dot_disk(ops: Operations,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    await mkdir(ops, f"{DOM}/.disk", "t1")
    try:
        tags = await listdir(ops, f"{DOM}/.disk", monkeypatch)
        assert "t1" in tags and stat.S_ISDIR(tags["t1"].st_mode)
        assert list(await listdir(ops, f"{DOM}/.disk/t1", monkeypatch)) == [
            "info", "vda.img", "vdb.img"]
        lines = (await read_file(ops, f"{DOM}/.disk/t1/info")).decode().splitlines()
        assert lines[0].split() == ["DISK", "ID", "TAG", "VM", "SIZE", "DATE", "VM", "CLOCK"]
        assert [line.split()[0] for line in lines[1:]] == ["vda", "vdb"]
        assert all(line.split()[2] == "t1" for line in lines[1:])
        await fails(errno.EEXIST, mkdir(ops, f"{DOM}/.disk", "t1"))
    finally:
        await rmdir(ops, f"{DOM}/.disk", "t1")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/t1"))

    # A VM snapshot's disk snapshot goes with the VM snapshot only.
    await mkdir(ops, DOM, "owned")
    try:
        assert "owned" not in await listdir(ops, f"{DOM}/.disk", monkeypatch)
        await fails(errno.ENOENT, rmdir(ops, f"{DOM}/.disk", "owned"))
        assert "owned" in await listdir(ops, DOM, monkeypatch)
    finally:
        await rmdir(ops, DOM, "owned")


async def test_apply_reverts_and_keeps_undo(ops: Operations,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    await mkdir(ops, DOM, "base")
    try:
        apply = await ops.open((await walk(ops, f"{DOM}/base/apply")).st_ino,
                               os.O_WRONLY | os.O_TRUNC, None)
        try:
            await fails(errno.EINVAL, ops.write(apply.fh, 0, b"sideways\n"))
            assert "is not 'running' or 'paused'" in (await status(ops))["last_error"]
            assert await ops.write(apply.fh, 0, b"\n") == 1
        finally:
            await ops.release(apply.fh)
        entries = await listdir(ops, DOM, monkeypatch)
        assert ".undo" in entries and stat.S_ISDIR(entries[".undo"].st_mode)
        undo = await listdir(ops, f"{DOM}/.undo", monkeypatch)
        assert "apply" in undo
        assert (await read_file(ops, f"{DOM}/.undo/snapshotdata.xl")).startswith(
            b'snapshot_name=".undo"')
        await fails(errno.EROFS, rmdir(ops, DOM, ".undo"))
        assert (await status(ops))["current"] == "base"
        # .undo is a snapshot like the others: applying it swaps back.
        undo_created = (await walk(ops, f"{DOM}/.undo")).st_mtime_ns
        undo_apply = await ops.open((await walk(ops, f"{DOM}/.undo/apply")).st_ino,
                                    os.O_WRONLY, None)
        try:
            assert await ops.write(undo_apply.fh, 0, b"running\n") == 8
        finally:
            await ops.release(undo_apply.fh)
        assert (await walk(ops, f"{DOM}/.undo")).st_mtime_ns >= undo_created
    finally:
        await rmdir(ops, DOM, "base")


async def test_status_is_never_cached_and_immutable_files_are(ops: Operations) -> None:
    await mkdir(ops, DOM, "cache")
    try:
        status_ino = (await walk(ops, f"{DOM}/.status")).st_ino
        first = await ops.open(status_ino, os.O_RDONLY, None)
        assert first.direct_io and not first.keep_cache
        await ops.release(first.fh)
        assert (await ops.getattr(status_ino, None)).attr_timeout == 0

        info = (await walk(ops, f"{DOM}/cache/info.json")).st_ino
        opens = [await ops.open(info, os.O_RDONLY, None) for _ in range(2)]
        assert [o.keep_cache for o in opens] == [False, True]
        assert not any(o.direct_io for o in opens)
        for o in opens:
            await ops.release(o.fh)
    finally:
        await rmdir(ops, DOM, "cache")


async def test_changes_made_by_the_cli_show_at_once(ops: Operations, domains: Env) -> None:
    await walk(ops, DOM)
    domains.snapfs("vm-snapshot-create", "-n", "fromcli", DOM)
    assert (await walk(ops, f"{DOM}/fromcli")).st_mode & stat.S_IFDIR
    domains.snapfs("vm-snapshot-delete", "-n", "fromcli", DOM)
    await fails(errno.ENOENT, walk(ops, f"{DOM}/fromcli"))


# -- disk views ------------------------------------------------------------------


@pytest.fixture
async def views(engine: Engine, domains: Env) -> Any:
    """The engine's disk views, as a mount has them; no server may outlive the test."""
    async with DiskViews(domains.run, idle=0) as served:
        engine.views = served
        yield served
        engine.views = None
        assert served.servers() == []


def qemu_io(image: Any, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True,
                   capture_output=True)


async def test_disk_views_show_the_disks_as_they_were(
        ops: Operations, engine: Engine, domains: Env, views: DiskViews,
        monkeypatch: pytest.MonkeyPatch) -> None:
    vda, vdb = (domains.images / f"{DOM}-{dev}.qcow2" for dev in ("vda", "vdb"))
    qemu_io(vda, "write -P 0x11 1M 64k")
    qemu_io(vdb, "write -P 0x22 2M 64k")
    await mkdir(ops, DOM, "old")
    await mkdir(ops, f"{DOM}/.disk", "oldtag")
    qemu_io(vda, "write -P 0x33 1M 64k")
    try:
        snap = await engine.snapshot(DOM, "old")
        listed = await listdir(ops, f"{DOM}/old/disks", monkeypatch)
        assert list(listed) == ["vda.img", "vda.changes", "vdb.img", "vdb.changes"]
        for dev in ("vda", "vdb"):
            attr = listed[f"{dev}.img"]
            assert stat.S_ISREG(attr.st_mode) and stat.S_IMODE(attr.st_mode) == 0o400
            assert attr.st_size == 16 << 20
            assert attr.st_mtime_ns == snap.creation_time * 10**9
            # What the snapshot references: the 64 KiB clusters holding its bytes.
            raw = domains.images / f"old-{dev}.raw"
            subprocess.run(["qemu-img", "convert", "-U", "-l", "snapshot.name=old", "-O", "raw",
                            str(domains.images / f"{DOM}-{dev}.qcow2"), str(raw)], check=True)
            data = raw.read_bytes()
            raw.unlink()
            used = [i for i in range(0, len(data), 64 << 10) if data[i:i + (64 << 10)].strip(b"\0")]
            assert attr.st_blocks == len(used) * (64 << 10) // 512
            changes = json.loads(await read_file(ops, f"{DOM}/old/disks/{dev}.changes"))
            assert changes["parent"] == (snap.parent or None)
            if snap.parent is None:
                assert [r["start"] for r in changes["ranges"]] == used
                assert {r["length"] for r in changes["ranges"]} == {64 << 10}
        old = await read_view(ops, f"{DOM}/old/disks/vda.img", (1 << 20) - 4096, 72 << 10)
        assert old == bytes(4096) + b"\x11" * (64 << 10) + bytes(4096)
        assert await read_view(ops, f"{DOM}/.disk/oldtag/vdb.img", 2 << 20, 64 << 10) == \
            b"\x22" * (64 << 10)
        end = await read_view(ops, f"{DOM}/old/disks/vdb.img", (16 << 20) - 10, 4096)
        assert end == bytes(10)     # reads end at the disk's end
        await fails(errno.ENOENT, walk(ops, f"{DOM}/old/disks/vdc.img"))
        await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/oldtag/vdc.img"))
        await fails(errno.EROFS, ops.open((await walk(ops, f"{DOM}/old/disks/vda.img")).st_ino,
                                          os.O_RDWR, None))
        await fails(errno.EROFS, mkdir(ops, f"{DOM}/old/disks", "x"))

        # An open view holds its snapshot, in the tree and for the engine.
        monkeypatch.setattr(model, "RELEASE_GRACE", 0.1)
        for parent, name, path in ((DOM, "old", f"{DOM}/old/disks/vdb.img"),
                                   (f"{DOM}/.disk", "oldtag", f"{DOM}/.disk/oldtag/vda.img")):
            info = await ops.open((await walk(ops, path)).st_ino, os.O_RDONLY, None)
            try:
                await fails(errno.EBUSY, rmdir(ops, parent, name))
                assert "open" in (await status(ops))["last_error"]
            finally:
                await ops.release(info.fh)
        assert views.servers() == []     # idle=0: stopped at the last close
    finally:
        await rmdir(ops, f"{DOM}/.disk", "oldtag")
        await rmdir(ops, DOM, "old")


async def test_an_apply_that_would_replace_a_viewed_undo_is_ebusy(
        ops: Operations, views: DiskViews) -> None:
    await mkdir(ops, DOM, "back")
    try:
        async def apply() -> None:
            fh = (await ops.open((await walk(ops, f"{DOM}/back/apply")).st_ino,
                                 os.O_WRONLY, None)).fh
            try:
                await ops.write(fh, 0, b"running\n")
            finally:
                await ops.release(fh)
        await apply()
        undo = await ops.open((await walk(ops, f"{DOM}/.undo/disks/vda.img")).st_ino,
                              os.O_RDONLY, None)
        try:
            before = await ops.read(undo.fh, 0, 4096)
            await fails(errno.EBUSY, apply())
            assert ".undo" in (await status(ops))["last_error"]
            assert await ops.read(undo.fh, 0, 4096) == before
        finally:
            await ops.release(undo.fh)
        await apply()
    finally:
        await rmdir(ops, DOM, "back")


async def read_view(ops: Operations, path: str, offset: int, size: int) -> bytes:
    info = await ops.open((await walk(ops, path)).st_ino, os.O_RDONLY, None)
    try:
        assert info.keep_cache is not None and not info.direct_io
        return await ops.read(info.fh, offset, size)
    finally:
        await ops.release(info.fh)


# -- bookkeeping -------------------------------------------------------------------


async def test_statfs_and_xattrs_answer(ops: Operations, domains: Env) -> None:
    st = await ops.statfs(None)
    real = os.statvfs(domains.state)
    assert st.f_blocks == real.f_blocks and st.f_bsize == real.f_bsize
    assert st.f_namemax == 64
    dom = (await walk(ops, DOM)).st_ino
    await fails(errno.ENOSYS, ops.getxattr(dom, b"user.x", None))
    assert await ops.listxattr(dom, None) == []
    await fails(errno.ENOTSUP, ops.setxattr(dom, b"user.x", b"1", None))
    await fails(pyfuse3.ENOATTR, ops.removexattr(dom, b"user.x", None))
