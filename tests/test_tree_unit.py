"""The tree over a fake engine: every kind of path and every errno, in milliseconds.

``FakeQueries`` keeps domains, VM snapshots (``.undo`` too), disk snapshots,
save images and configs in memory, and its verbs change them as the engine
would (it can be told to fail the next call of any of them). The tests go
through ``fs.Operations`` as the kernel does, so what they check is what a
user sees: names listed, attributes, bytes read, the errno of a refusal.
``test_tree_model.py`` does the same over the real engine and qemu-img.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from snapfs.errors import (
    AlreadyExists,
    Busy,
    NoSpace,
    NotFound,
    NotSupported,
    QemuError,
    SnapfsError,
    StateError,
)
from snapfs.images import DiskSnapshot, DiskTable
from snapfs.ops import kinds, model
from snapfs.ops.fs import Inodes, Operations
from snapfs.ops.model import FRESH, Tree
from snapfs.ops.mount import _options
from snapfs.ops.queries import Queries, Readable
from snapfs.status import DomainStatus, Progress
from snapfs.store import UNDO, VmSnapshot, format_info

ROOT = pyfuse3.ROOT_INODE
DOM = "web1"
MIB = 1 << 20
SEC = 1_000_000_000


# -- the fake engine ------------------------------------------------------------------


class FakeReader:
    """A save image or a disk view: ``data`` then zeros, up to ``size`` bytes."""

    def __init__(self, fake: FakeQueries, data: bytes, size: int) -> None:
        self.fake, self.data, self.size = fake, data, size
        fake.open_readers.add(self)

    async def read(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        end = min(offset + size, self.size)
        return self.data[offset:end].ljust(max(0, end - offset), b"\0")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.fake.open_readers.discard(self)


@dataclass
class FakeDomain:
    name: str
    disks: dict[str, tuple[int, int]]       # dev -> (virtual size, bytes the image takes)
    defined_ns: int = 1_600_000_000 * SEC
    state: str = "shutoff"
    current: str = ""
    last_error: str = ""
    operation: Progress | None = None
    snapshots: dict[str, VmSnapshot] = field(default_factory=dict)   # oldest first
    undo: VmSnapshot | None = None
    tags: dict[str, list[DiskSnapshot]] = field(default_factory=dict)
    saves: dict[str, bytes] = field(default_factory=dict)
    configs: dict[str, bytes] = field(default_factory=dict)
    contents: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (tag, dev) -> bytes
    usage: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # size, blocks
    changes: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)


class FakeQueries:
    """The engine's queries and verbs over ``FakeDomain``s in memory.

    ``disk_table`` answers from a cache, as the engine does, until asked
    ``fresh`` or until one of these verbs changes the domain; ``elsewhere``
    changes a domain behind that cache, as another process would.
    """

    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.clock = 1_700_000_000
        self.serving_views = True
        self.open_readers: set[FakeReader] = set()
        self._failures: dict[str, SnapfsError] = {}
        self._tables: dict[str, DiskTable] = {}

    # -- setting up -------------------------------------------------------------

    def define(self, name: str, disks: Mapping[str, tuple[int, int]]) -> FakeDomain:
        self.domains[name] = FakeDomain(name, dict(disks))
        return self.domains[name]

    def fail_next(self, method: str, err: SnapfsError) -> None:
        """The next call of ``method`` raises ``err`` (and, as a verb, records it)."""
        self._failures[method] = err

    def _check(self, method: str, domain: str, verb: bool = False) -> FakeDomain:
        if domain not in self.domains:
            raise NotFound(f"no domain named {domain!r}")
        err = self._failures.pop(method, None)
        if err is not None:
            raise self._refuse(self.domains[domain], err) if verb else err
        return self.domains[domain]

    def _refuse(self, dom: FakeDomain, err: SnapfsError) -> SnapfsError:
        """A verb's failure: the engine keeps it as the domain's last_error."""
        dom.last_error = str(err)
        return err

    def _tick(self) -> int:
        self.clock += 10
        return self.clock

    def _tag(self, dom: FakeDomain, tag: str, content: bytes = b"") -> None:
        when = self._tick()
        dom.tags[tag] = [DiskSnapshot(dev, str(len(dom.tags) + 1), tag, 0, when, 5000,
                                      61, 2_000_000) for dev in dom.disks]
        for dev in dom.disks:
            dom.contents[(tag, dev)] = content + dev.encode()

    def _snap(self, dom: FakeDomain, name: str, tag: str, save: bytes | None) -> VmSnapshot:
        self._tag(dom, tag, f"{name} on ".encode())
        snap = VmSnapshot(
            name, self._tick(), Path(f"/fake/{name}.save") if save is not None else None,
            dom.state, dom.current if dom.current in dom.snapshots else "", tuple(dom.disks),
            save_sha256=hashlib.sha256(save or b"").hexdigest(), save_size=len(save or b""),
            tag=tag if tag != name else "")
        if save is not None:
            dom.saves[name] = save
        dom.configs[name] = f'name = "{dom.name}"\n# as at {name}\n'.encode()
        return snap

    def elsewhere(self, domain: str) -> FakeDomain:
        """The domain, to be changed as another process would: behind the cache."""
        self._tables.setdefault(domain, self._table(self.domains[domain]))
        return self.domains[domain]

    # -- domains ----------------------------------------------------------------

    def domain_names(self) -> list[str]:
        return sorted(self.domains)

    def domain_exists(self, domain: str) -> bool:
        return domain in self.domains

    def domains_mtime_ns(self) -> int:
        return max((d.defined_ns for d in self.domains.values()), default=0)

    def domain_mtime_ns(self, domain: str) -> int:
        return self._check("domain_mtime_ns", domain).defined_ns

    async def status(self, domain: str) -> DomainStatus:
        await trio.lowlevel.checkpoint()
        dom = self._check("status", domain)
        return DomainStatus(domain, dom.state, dom.current, dom.operation, dom.last_error)

    def current(self, domain: str) -> str:
        return self._check("current", domain).current

    def record_error(self, domain: str, message: str) -> None:
        self.domains[domain].last_error = message

    def statfs(self) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1000, 500, 400, 0, 0, 0, 0, 255))

    # -- VM snapshots -----------------------------------------------------------

    async def snapshots(self, domain: str) -> Mapping[str, VmSnapshot]:
        await trio.lowlevel.checkpoint()
        return dict(self._check("snapshots", domain).snapshots)

    async def snapshot(self, domain: str, name: str) -> VmSnapshot:
        await trio.lowlevel.checkpoint()
        dom = self._check("snapshot", domain)
        snap = dom.undo if name == UNDO else dom.snapshots.get(name)
        if snap is None:
            raise NotFound(f"no VM snapshot {name!r} of {domain!r}")
        return snap

    async def snapshot_config(self, domain: str, name: str) -> bytes:
        await self.snapshot(domain, name)
        return self.domains[domain].configs[name]

    async def save_size(self, domain: str, name: str) -> tuple[int, int]:
        await self.snapshot(domain, name)
        data = self.domains[domain].saves.get(name)
        if data is None:
            raise NotFound(f"snapshot {name!r} has no save image")
        return len(data), 8 * -(-len(data) // 4096)     # whole 4 KiB blocks, as a file system

    async def open_save(self, domain: str, name: str) -> Readable:
        await self.snapshot(domain, name)
        self._check("open_save", domain)
        data = self.domains[domain].saves.get(name)
        if data is None:
            raise NotFound(f"snapshot {name!r} has no save image")
        return FakeReader(self, data, len(data))

    # -- disks --------------------------------------------------------------------

    def _table(self, dom: FakeDomain) -> DiskTable:
        return DiskTable({t: list(s) for t, s in dom.tags.items()}, dict(dom.disks))

    async def disk_table(self, domain: str, fresh: bool = False) -> DiskTable:
        await trio.lowlevel.checkpoint()
        dom = self._check("disk_table", domain)
        if fresh or domain not in self._tables:
            self._tables[domain] = self._table(dom)
        return self._tables[domain]

    async def open_disk_view(self, domain: str, tag: str, dev: str) -> Readable:
        await trio.lowlevel.checkpoint()
        dom = self._check("open_disk_view", domain)
        if not self.serving_views:
            raise StateError("disk views are served by a mounted tree only")
        if not any(s.dev == dev for s in dom.tags.get(tag, [])):
            raise NotFound(f"no disk {dev!r} in snapshot {tag!r} of {domain!r}")
        return FakeReader(self, dom.contents[(tag, dev)], dom.disks[dev][0])

    async def disk_usage(self, domain: str, tag: str, dev: str) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        return self._check("disk_usage", domain).usage.get((tag, dev))

    async def disk_changes(self, domain: str, tag: str, dev: str, parent: str | None
                           ) -> tuple[str | None, list[tuple[int, int]]]:
        await trio.lowlevel.checkpoint()
        dom = self._check("disk_changes", domain)
        if (tag, dev) not in dom.changes:
            raise NotSupported(f"{dev} of {domain!r} is served by qemu-nbd")
        return (parent if parent in dom.tags else None), dom.changes[(tag, dev)]

    # -- verbs ----------------------------------------------------------------------

    def _changed(self, domain: str) -> None:
        self._tables.pop(domain, None)

    async def vm_snapshot_create(self, name: str, snapshot: str | None = None) -> VmSnapshot:
        await trio.lowlevel.checkpoint()
        dom = self._check("vm_snapshot_create", name, verb=True)
        snapshot = snapshot or str(self.clock)
        if snapshot in dom.snapshots or snapshot in dom.tags:
            raise self._refuse(dom, AlreadyExists(f"snapshot {snapshot!r} of {name!r} "
                                                  "already exists"))
        save = None if dom.state == "shutoff" else f"memory of {snapshot}".encode()
        snap = dom.snapshots[snapshot] = self._snap(dom, snapshot, snapshot, save)
        dom.current = snapshot
        self._changed(name)
        return snap

    async def vm_snapshot_delete(self, name: str, snapshot: str) -> None:
        await trio.lowlevel.checkpoint()
        dom = self._check("vm_snapshot_delete", name, verb=True)
        snap = dom.snapshots.pop(snapshot, None)
        if snap is None:
            raise self._refuse(dom, NotFound(f"no VM snapshot {snapshot!r}"))
        del dom.tags[snap.disk_tag]
        dom.saves.pop(snapshot, None)
        if dom.current == snapshot:
            dom.current = snap.parent
        self._changed(name)

    async def vm_snapshot_apply(self, name: str, snapshot: str, paused: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        dom = self._check("vm_snapshot_apply", name, verb=True)
        target = await self.snapshot(name, snapshot)
        if dom.undo is not None:
            dom.tags.pop(dom.undo.disk_tag, None)
        dom.undo = replace(self._snap(dom, UNDO, f"undo-{self.clock}", b"memory before apply"),
                           state=dom.state)
        dom.state = "paused" if paused else "running"
        if snapshot != UNDO:
            dom.current = target.name
        self._changed(name)

    async def disk_snapshot_create(self, name: str, tag: str | None = None) -> str:
        await trio.lowlevel.checkpoint()
        dom = self._check("disk_snapshot_create", name, verb=True)
        tag = tag or str(self.clock)
        if tag in dom.tags:
            raise self._refuse(dom, AlreadyExists(f"tag {tag!r} already exists"))
        self._tag(dom, tag, f"disks at {tag} on ".encode())
        self._changed(name)
        return tag

    async def disk_snapshot_delete(self, name: str, id: str | None = None,
                                   tag: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        dom = self._check("disk_snapshot_delete", name, verb=True)
        if tag in dom.snapshots:
            raise self._refuse(dom, Busy(f"disk snapshot {tag!r} belongs to VM snapshot "
                                         f"{tag!r}: delete that"))
        if tag not in dom.tags:
            raise self._refuse(dom, NotFound(f"no disk snapshot {tag!r}"))
        del dom.tags[tag]
        self._changed(name)


def _is_queries(fake: FakeQueries) -> Queries:
    return fake     # mypy checks here that the fake has the engine's side of the contract


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeQueries]:
    """web1 (two disks, snapshots s1 running and s2 shut off, .undo, disk snapshot t1)
    and db (no snapshots)."""
    fake = FakeQueries()
    web = fake.define(DOM, {"vda": (16 * MIB, 3 * MIB), "vdb": (8 * MIB, 20 * MIB)})
    web.state = "running"
    web.snapshots["s1"] = fake._snap(web, "s1", "s1", b"memory at s1 " * 1000)
    web.current = "s1"
    web.state = "shutoff"
    web.snapshots["s2"] = fake._snap(web, "s2", "s2", None)
    web.current = "s2"
    fake._tag(web, "t1", b"disks at t1 on ")
    web.undo = fake._snap(web, UNDO, "undo-1", b"memory before apply")
    # qemu-img can make tags no file can be named after: they are not shown.
    fake._tag(web, "a/b")
    fake._tag(web, "..")
    fake.define("db", {"vda": (4 * MIB, 0)})
    yield fake
    assert not fake.open_readers, "a reader the tree opened was never closed"


@pytest.fixture
def ops(fake: FakeQueries) -> Operations:
    return Operations(Tree(_is_queries(fake), uid=1234, gid=5678))


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


class Listing:
    """Stands in for the kernel's readdirplus buffer: room for ``room`` entries."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.entries: list[tuple[bytes, Any, int]] = []

    def reply(self, token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        if len(self.entries) >= self.room:
            return False
        self.entries.append((name, attr, next_id))
        return True


async def walk(ops: Operations, path: str) -> Any:
    """Lookup each name of ``path`` in turn, as the kernel does; the last entry."""
    attr = await ops.getattr(ROOT)
    for name in filter(None, path.split("/")):
        attr = await ops.lookup(attr.st_ino, name.encode())
    return attr


async def listdir(ops: Operations, path: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    listing = Listing()
    monkeypatch.setattr(pyfuse3, "readdir_reply", listing.reply)
    fh = await ops.opendir((await walk(ops, path)).st_ino)
    await ops.readdir(fh, 0, None)
    await ops.releasedir(fh)
    return {name.decode(): attr for name, attr, _ in listing.entries}


async def read_file(ops: Operations, path: str, flags: int = os.O_RDONLY) -> bytes:
    info = await ops.open((await walk(ops, path)).st_ino, flags)
    try:
        chunks: list[bytes] = []
        while chunk := await ops.read(info.fh, sum(len(c) for c in chunks), 7):
            chunks.append(chunk)  # small reads: offsets must be honoured
        return b"".join(chunks)
    finally:
        await ops.release(info.fh)


async def read_at(ops: Operations, path: str, offset: int, size: int) -> bytes:
    info = await ops.open((await walk(ops, path)).st_ino, os.O_RDONLY, None)
    try:
        return await ops.read(info.fh, offset, size)
    finally:
        await ops.release(info.fh)


async def fails(errnum: int, call: Any) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    assert caught.value.errno == errnum, (errno.errorcode[caught.value.errno],
                                         errno.errorcode[errnum])


async def status(ops: Operations, dom: str = DOM) -> dict[str, str]:
    text = (await read_file(ops, f"{dom}/.status")).decode()
    return dict(line.split(": ", 1) for line in text.splitlines())


async def mkdir(ops: Operations, parent: str, name: str) -> Any:
    return await ops.mkdir((await walk(ops, parent)).st_ino, name.encode(), 0o755, None)


async def rmdir(ops: Operations, parent: str, name: str) -> None:
    await ops.rmdir((await walk(ops, parent)).st_ino, name.encode(), None)


async def write_apply(ops: Operations, snapshot: str, word: bytes) -> int:
    info = await ops.open((await walk(ops, f"{DOM}/{snapshot}/apply")).st_ino,
                          os.O_WRONLY | os.O_TRUNC, None)
    try:
        written: int = await ops.write(info.fh, 0, word)
        return written
    finally:
        await ops.release(info.fh)


def perm(attr: Any) -> int:
    return stat.S_IMODE(attr.st_mode)


# -- every kind of path ---------------------------------------------------------------------


async def test_the_root_lists_the_domains(ops: Operations, fake: FakeQueries,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = await ops.getattr(ROOT, None)
    assert stat.S_ISDIR(root.st_mode) and perm(root) == 0o555
    assert root.st_nlink == 2 + 2
    assert root.st_mtime_ns == fake.domains_mtime_ns()
    assert (root.st_uid, root.st_gid) == (1234, 5678)
    entries = await listdir(ops, "", monkeypatch)
    assert list(entries) == ["db", DOM]
    assert all(stat.S_ISDIR(a.st_mode) and perm(a) == 0o755 for a in entries.values())


async def test_a_domain_lists_its_entries_then_its_snapshots(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = await listdir(ops, DOM, monkeypatch)
    assert list(entries) == [".status", ".current", ".disk", ".undo", "s1", "s2"]
    web = await walk(ops, DOM)
    assert perm(web) == 0o755   # mkdir and rmdir are verbs here
    assert web.st_nlink == 2 + sum(stat.S_ISDIR(a.st_mode) for a in entries.values())
    assert web.st_mtime_ns == fake.domains[DOM].snapshots["s2"].creation_time * SEC
    assert web.entry_timeout == web.attr_timeout == FRESH == 0.5

    # Nothing made yet: no .current, no .undo; the definition's time.
    assert list(await listdir(ops, "db", monkeypatch)) == [".status", ".disk"]
    db = await walk(ops, "db")
    assert db.st_nlink == 3 and db.st_mtime_ns == fake.domains["db"].defined_ns
    await fails(errno.ENOENT, walk(ops, "db/.current"))
    await fails(errno.ENOENT, walk(ops, "db/.undo"))


async def test_status_is_generated_at_each_open_and_never_cached(
        ops: Operations, fake: FakeQueries) -> None:
    fake.domains[DOM].operation = Progress("vm-snapshot-create", phase="saving memory",
                                           done=50, total=200, pid=7)
    fake.domains[DOM].last_error = "oops"
    attr = await walk(ops, f"{DOM}/.status")
    assert stat.S_ISREG(attr.st_mode) and perm(attr) == 0o444
    assert attr.entry_timeout == attr.attr_timeout == 0
    lines = await status(ops)
    assert lines == {"domain": DOM, "state": "shutoff", "current": "s2",
                     "operation": "vm-snapshot-create (saving memory) 25% (50 of 200 bytes) pid 7",
                     "last_error": "oops"}
    assert attr.st_size == len(await read_file(ops, f"{DOM}/.status"))
    opened = await ops.open(attr.st_ino, os.O_RDONLY, None)
    assert opened.direct_io and not opened.keep_cache
    await ops.release(opened.fh)

    fake.domains[DOM].operation = None
    assert (await status(ops))["operation"] == "-"
    assert (await status(ops, "db"))["current"] == "-"


async def test_current_is_a_symlink_to_the_snapshot(ops: Operations, fake: FakeQueries) -> None:
    attr = await walk(ops, f"{DOM}/.current")
    assert stat.S_ISLNK(attr.st_mode) and perm(attr) == 0o777
    assert await ops.readlink(attr.st_ino, None) == b"s2"
    assert attr.st_size == 2
    assert attr.st_mtime_ns == fake.domains[DOM].snapshots["s2"].creation_time * SEC
    await fails(errno.EINVAL, ops.readlink((await walk(ops, DOM)).st_ino, None))


async def test_dot_disk_lists_the_disk_only_snapshots(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    tags = await listdir(ops, f"{DOM}/.disk", monkeypatch)
    # s1, s2 and undo-1 belong to VM snapshots: their disks show in their own disks/.
    assert list(tags) == ["t1"]
    for owned in ("s1", "s2", "undo-1"):
        await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/{owned}"))
        await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/{owned}/vda.img"))
    disk = await walk(ops, f"{DOM}/.disk")
    assert perm(disk) == 0o755 and disk.st_nlink == 2 + 1
    newest = max(s.date_sec for tag in tags for s in fake.domains[DOM].tags[tag])
    assert disk.st_mtime_ns == newest * SEC
    t1 = tags["t1"]
    assert stat.S_ISDIR(t1.st_mode) and perm(t1) == 0o555 and t1.st_nlink == 2
    vda = fake.domains[DOM].tags["t1"][0]
    assert t1.st_mtime_ns == vda.date_sec * SEC + vda.date_nsec
    assert list(await listdir(ops, f"{DOM}/.disk/t1", monkeypatch)) == [
        "info", "vda.img", "vdb.img"]
    assert await listdir(ops, "db/.disk", monkeypatch) == {}


async def test_a_disk_snapshot_info_has_a_line_per_disk(ops: Operations) -> None:
    attr = await walk(ops, f"{DOM}/.disk/t1/info")
    assert stat.S_ISREG(attr.st_mode) and perm(attr) == 0o444
    text = (await read_file(ops, f"{DOM}/.disk/t1/info")).decode()
    assert attr.st_size == len(text)
    lines = text.splitlines()
    assert lines[0].split() == ["DISK", "ID", "TAG", "VM", "SIZE", "DATE", "VM", "CLOCK"]
    assert [line.split()[0] for line in lines[1:]] == ["vda", "vdb"]
    assert all(line.split()[2] == "t1" for line in lines[1:])
    assert all(line.endswith("0000:01:01.002") for line in lines[1:])


async def test_a_view_takes_what_its_snapshot_references_and_lists_its_changes(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    web = fake.domains[DOM]
    web.usage[("s1", "vda")] = (12 * MIB, 2048)     # the disk was smaller then
    web.changes[("s2", "vda")] = [(0, 65536), (MIB, 4096)]
    attr = await walk(ops, f"{DOM}/s1/disks/vda.img")
    assert attr.st_size == 12 * MIB and attr.st_blocks == 2048
    assert list(await listdir(ops, f"{DOM}/s2/disks", monkeypatch)) == [
        "vda.img", "vda.changes", "vdb.img"]    # vdb: only qemu-nbd reads it, no changes
    text = await read_file(ops, f"{DOM}/s2/disks/vda.changes")
    changes = await walk(ops, f"{DOM}/s2/disks/vda.changes")
    assert changes.st_size == len(text)
    assert stat.S_ISREG(changes.st_mode) and perm(changes) == 0o400    # root-only, as the view
    assert json.loads(text) == {"parent": "s1", "ranges": [{"start": 0, "length": 65536},
                                                           {"start": MIB, "length": 4096}]}
    await fails(errno.ENOENT, walk(ops, f"{DOM}/s2/disks/vdb.changes"))
    await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/t1/vda.changes"))


async def test_disk_views_are_the_disks_at_their_snapshot(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    web = fake.domains[DOM]
    for path, mtime in ((f"{DOM}/.disk/t1/vda.img", web.tags["t1"][0].date_sec * SEC + 5000),
                        (f"{DOM}/s1/disks/vda.img", web.snapshots["s1"].creation_time * SEC)):
        attr = await walk(ops, path)
        assert stat.S_ISREG(attr.st_mode) and perm(attr) == 0o400
        assert attr.st_size == 16 * MIB and attr.st_mtime_ns == mtime
        assert attr.st_blocks == 3 * MIB // 512     # what the image takes
    assert (await walk(ops, f"{DOM}/s1/disks/vdb.img")).st_blocks == 8 * MIB // 512
    assert list(await listdir(ops, f"{DOM}/s1/disks", monkeypatch)) == ["vda.img", "vdb.img"]
    disks = await walk(ops, f"{DOM}/s1/disks")
    assert perm(disks) == 0o555 and disks.st_nlink == 2

    assert await read_at(ops, f"{DOM}/.disk/t1/vdb.img", 0, 22) == b"disks at t1 on vdb\0\0\0\0"
    assert await read_at(ops, f"{DOM}/s1/disks/vda.img", 3, 9) == b"on vda\0\0\0"
    assert await read_at(ops, f"{DOM}/.undo/disks/vda.img", 0, 9) == b".undo on "
    assert await read_at(ops, f"{DOM}/s1/disks/vdb.img", 8 * MIB - 2, 10) == bytes(2)

    opened = await ops.open((await walk(ops, f"{DOM}/s1/disks/vda.img")).st_ino, os.O_RDONLY)
    assert not opened.direct_io
    await ops.release(opened.fh)


async def test_a_snapshot_directory_holds_its_files(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = fake.domains[DOM].snapshots["s1"]
    attr = await walk(ops, f"{DOM}/s1")
    assert stat.S_ISDIR(attr.st_mode) and perm(attr) == 0o555 and attr.st_nlink == 3
    assert attr.st_mtime_ns == s1.creation_time * SEC
    files = await listdir(ops, f"{DOM}/s1", monkeypatch)
    assert list(files) == ["snapshotdata.xl", "info.json", "config.toml", "save", "disks",
                           "apply"]
    # Taken shut off: no save image.
    assert list(await listdir(ops, f"{DOM}/s2", monkeypatch)) == [
        "snapshotdata.xl", "info.json", "config.toml", "disks", "apply"]
    await fails(errno.ENOENT, walk(ops, f"{DOM}/s2/save"))

    for name in ("snapshotdata.xl", "info.json", "config.toml"):
        data = await read_file(ops, f"{DOM}/s1/{name}")
        assert stat.S_ISREG(files[name].st_mode) and perm(files[name]) == 0o444
        assert files[name].st_size == len(data)
        assert files[name].st_blocks == (len(data) + 511) // 512
        assert files[name].st_mtime_ns == s1.creation_time * SEC
    assert await read_file(ops, f"{DOM}/s1/snapshotdata.xl") == format_info(s1).encode()
    assert await read_file(ops, f"{DOM}/s1/config.toml") == fake.domains[DOM].configs["s1"]
    info = json.loads(await read_file(ops, f"{DOM}/s1/info.json"))
    assert info["name"] == "s1" and info["disk_tag"] == "s1"
    assert info["save"] == "/fake/s1.save"
    assert [(d["dev"], d["tag"]) for d in info["disk_snapshots"]] == [("vda", "s1"),
                                                                       ("vdb", "s1")]


async def test_the_save_image_is_the_stored_bytes(ops: Operations, fake: FakeQueries) -> None:
    attr = await walk(ops, f"{DOM}/s1/save")
    stored = fake.domains[DOM].saves["s1"]
    assert stat.S_ISREG(attr.st_mode) and perm(attr) == 0o400   # guest memory: root only
    assert attr.st_size == len(stored)
    assert attr.st_blocks == 8 * 4      # the engine's count, not one made from the size
    assert attr.st_mtime_ns == fake.domains[DOM].snapshots["s1"].creation_time * SEC
    assert await read_file(ops, f"{DOM}/s1/save") == stored
    assert await read_at(ops, f"{DOM}/s1/save", 13, 6) == b"memory"


async def test_apply_is_write_only_and_reverts(ops: Operations, fake: FakeQueries,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    attr = await walk(ops, f"{DOM}/s1/apply")
    assert stat.S_ISREG(attr.st_mode) and perm(attr) == 0o200 and attr.st_size == 0
    assert await read_file(ops, f"{DOM}/s1/apply") == b""   # a backup copies it empty
    opened = await ops.open(attr.st_ino, os.O_WRONLY, None)
    assert opened.direct_io
    await ops.release(opened.fh)

    assert await write_apply(ops, "s1", b"paused\n") == 7
    assert (await status(ops))["state"] == "paused"
    assert (await status(ops))["current"] == "s1"
    assert await write_apply(ops, "s1", b"\n") == 1
    assert (await status(ops))["state"] == "running"
    # Truncating apply is what `echo running > apply` may ask first: allowed.
    fields = SimpleNamespace(update_mode=False, update_uid=False, update_gid=False,
                             update_size=True, update_atime=False, update_mtime=False)
    truncated = await ops.setattr(attr.st_ino, SimpleNamespace(st_size=0), fields, None, None)
    assert truncated.st_size == 0


async def test_undo_is_a_snapshot_directory_that_cannot_be_removed(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    attr = await walk(ops, f"{DOM}/.undo")
    assert stat.S_ISDIR(attr.st_mode) and perm(attr) == 0o555 and attr.st_nlink == 3
    assert list(await listdir(ops, f"{DOM}/.undo", monkeypatch)) == [
        "snapshotdata.xl", "info.json", "config.toml", "save", "disks", "apply"]
    assert (await read_file(ops, f"{DOM}/.undo/snapshotdata.xl")).startswith(
        b'snapshot_name=".undo"')
    assert await read_file(ops, f"{DOM}/.undo/save") == b"memory before apply"
    assert list(await listdir(ops, f"{DOM}/.undo/disks", monkeypatch)) == ["vda.img", "vdb.img"]
    await fails(errno.EROFS, rmdir(ops, DOM, ".undo"))
    assert "read-only" not in (await status(ops))["last_error"], "refusals are not news"
    # .undo is a snapshot like the others: applying it swaps back.
    assert await write_apply(ops, ".undo", b"running\n") == 8
    assert (await walk(ops, f"{DOM}/.undo")).st_mtime_ns > attr.st_mtime_ns


async def test_what_fits_no_path_of_the_tree_is_enoent(ops: Operations) -> None:
    for path in ("", f"{DOM}/.undo", f"{DOM}/.undo/save", f"{DOM}/.disk/t1/info",
                 f"{DOM}/s1/disks", f"{DOM}/s1/disks/vda.img", f"{DOM}/.undo/disks/vda.img",
                 f"{DOM}/.disk/t1/vda.img"):
        await walk(ops, path)
    for path in (f"{DOM}/.other", f"{DOM}/.disk/t1/save", f"{DOM}/s1/save/x",
                 f"{DOM}/.status/x", f"{DOM}/s1/disks/.img", f"{DOM}/s1/disks/vda",
                 f"{DOM}/s1/disks/vda.img/x", f"{DOM}/s1/vda.img", f"{DOM}/.disk/t1/vdc.img",
                 f"{DOM}/s1/disks/vdc.img", f"{DOM}/.disk/a", f"{DOM}/s1/info.json/x",
                 "nosuchdomain", f"{DOM}/nosuchsnapshot", f"{DOM}/.nothing", "db/s1"):
        await fails(errno.ENOENT, walk(ops, path))
    await fails(errno.ENOENT, ops.lookup(ROOT, b"\xff\xfe", None))
    await fails(errno.ENOENT, ops.lookup(ROOT, b"bad name", None))
    await fails(errno.ENOENT, ops.lookup((await walk(ops, DOM)).st_ino, b"x" * 300, None))
    await fails(errno.ENOENT, ops.getattr(999_999, None))


def test_the_docstring_shows_the_table_of_kinds() -> None:
    assert kinds.TABLE.describe() in (kinds.__doc__ or "")


# -- what the kernel may cache --------------------------------------------------------------


async def test_an_unchanged_file_keeps_the_kernels_pages(
        ops: Operations, fake: FakeQueries) -> None:
    for path in (f"{DOM}/s1/info.json", f"{DOM}/s1/save", f"{DOM}/s1/disks/vda.img",
                 f"{DOM}/.disk/t1/info", f"{DOM}/.disk/t1/vdb.img"):
        ino = (await walk(ops, path)).st_ino
        opens = [await ops.open(ino, os.O_RDONLY, None) for _ in range(2)]
        assert [o.keep_cache for o in opens] == [False, True], path
        assert not any(o.direct_io for o in opens), path
        for o in opens:
            await ops.release(o.fh)


async def test_a_name_taken_again_is_read_afresh(ops: Operations, fake: FakeQueries) -> None:
    await mkdir(ops, f"{DOM}/.disk", "again")
    for _ in range(2):
        opened = await ops.open((await walk(ops, f"{DOM}/.disk/again/vda.img")).st_ino,
                                os.O_RDONLY, None)
        await ops.release(opened.fh)
    await rmdir(ops, f"{DOM}/.disk", "again")
    await mkdir(ops, f"{DOM}/.disk", "again")
    for path in (f"{DOM}/.disk/again/vda.img", f"{DOM}/.disk/again/info"):
        opened = await ops.open((await walk(ops, path)).st_ino, os.O_RDONLY, None)
        assert not opened.keep_cache, path
        await ops.release(opened.fh)


async def test_a_view_opens_the_snapshot_as_it_is_now(
        ops: Operations, fake: FakeQueries) -> None:
    ino = (await walk(ops, f"{DOM}/.disk/t1/vda.img")).st_ino
    opened = await ops.open(ino, os.O_RDONLY, None)
    await ops.release(opened.fh)
    # Another process deletes t1 and takes a new t1, behind the engine's cache.
    web = fake.elsewhere(DOM)
    del web.tags["t1"]
    fake._tag(web, "t1", b"new t1 on ")
    opened = await ops.open(ino, os.O_RDONLY, None)
    try:
        assert not opened.keep_cache    # the kernel's pages are the old t1's
        assert await ops.read(opened.fh, 0, 13) == b"new t1 on vda"
    finally:
        await ops.release(opened.fh)
    del fake.elsewhere(DOM).tags["t1"]
    await fails(errno.ENOENT, ops.open(ino, os.O_RDONLY, None))


async def test_changes_made_elsewhere_show_at_once(ops: Operations, fake: FakeQueries) -> None:
    await fails(errno.ENOENT, walk(ops, f"{DOM}/fromcli"))
    web = fake.elsewhere(DOM)
    web.snapshots["fromcli"] = fake._snap(web, "fromcli", "fromcli", None)
    assert stat.S_ISDIR((await walk(ops, f"{DOM}/fromcli")).st_mode)
    del web.snapshots["fromcli"]
    await fails(errno.ENOENT, walk(ops, f"{DOM}/fromcli"))
    fake.define("new", {"vda": (MIB, 0)})
    assert stat.S_ISDIR((await walk(ops, "new")).st_mode)


# -- verbs and their errnos ---------------------------------------------------------------


async def test_mkdir_and_rmdir_make_and_delete_snapshots(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = await mkdir(ops, DOM, "new")
    assert stat.S_ISDIR(entry.st_mode) and perm(entry) == 0o555
    assert entry.st_mtime_ns == fake.domains[DOM].snapshots["new"].creation_time * SEC
    assert "new" in await listdir(ops, DOM, monkeypatch)
    assert "new" not in await listdir(ops, f"{DOM}/.disk", monkeypatch)    # a VM snapshot's
    assert os.fsdecode(await ops.readlink((await walk(ops, f"{DOM}/.current")).st_ino)) == "new"
    await rmdir(ops, DOM, "new")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/new"))
    assert "new" not in await listdir(ops, f"{DOM}/.disk", monkeypatch)

    tag = await mkdir(ops, f"{DOM}/.disk", "t2")
    assert stat.S_ISDIR(tag.st_mode) and tag.st_nlink == 2
    assert list(await listdir(ops, f"{DOM}/.disk/t2", monkeypatch)) == [
        "info", "vda.img", "vdb.img"]
    await rmdir(ops, f"{DOM}/.disk", "t2")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/.disk/t2"))
    # A name of 64 bytes is fine.
    await mkdir(ops, DOM, "x" * 64)


@pytest.mark.parametrize("name, errnum", [
    (b".hidden", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a\x01b", errno.EINVAL),
    (b"tab\there", errno.EINVAL),
    (b"\xff\xfe", errno.EINVAL),
    (b"x" * 65, errno.ENAMETOOLONG),
    (b"x" * 1024, errno.ENAMETOOLONG),
    ("é".encode() * 33, errno.ENAMETOOLONG),   # 33 characters, 66 bytes
], ids=["dot", "empty", "control", "tab", "not-utf8", "65-bytes", "1024-bytes",
        "66-bytes-utf8"])
async def test_bad_snapshot_names_are_refused_and_reported(
        ops: Operations, fake: FakeQueries, name: bytes, errnum: int) -> None:
    for parent in (DOM, f"{DOM}/.disk"):
        fake.domains[DOM].last_error = "an earlier, real failure"
        await fails(errnum, ops.mkdir((await walk(ops, parent)).st_ino, name, 0o755, None))
        # A file manager probing `.Trash-0` does not bury it.
        assert (await status(ops))["last_error"] == "an earlier, real failure"
    assert sorted(fake.domains[DOM].snapshots) == ["s1", "s2"]


async def test_a_bad_word_written_to_apply_is_einval(ops: Operations,
                                                     fake: FakeQueries) -> None:
    await fails(errno.EINVAL, write_apply(ops, "s1", b"sideways\n"))
    assert "is not 'running' or 'paused'" in (await status(ops))["last_error"]
    assert (await status(ops))["state"] == "shutoff"


@pytest.mark.parametrize("err, errnum", [
    (AlreadyExists("snapshot 'n' of 'web1' already exists"), errno.EEXIST),
    (NotSupported("disk vda is not qcow2"), errno.EOPNOTSUPP),
    (NoSpace("no space left on device while saving memory"), errno.ENOSPC),
    (QemuError("QMP: migration failed"), errno.EIO),
    (Busy("a view of .undo is open"), errno.EBUSY),
], ids=["EEXIST", "EOPNOTSUPP", "ENOSPC", "EIO", "EBUSY"])
@pytest.mark.parametrize("verb, parent", [("vm_snapshot_create", DOM),
                                          ("disk_snapshot_create", f"{DOM}/.disk")])
async def test_a_failed_mkdir_answers_the_engines_errno_and_leaves_nothing(
        ops: Operations, fake: FakeQueries, verb: str, parent: str, err: SnapfsError,
        errnum: int) -> None:
    fake.fail_next(verb, err)
    await fails(errnum, mkdir(ops, parent, "n"))
    assert (await status(ops))["last_error"] == str(err)
    await fails(errno.ENOENT, walk(ops, f"{parent}/n"))


async def test_a_taken_name_is_eexist(ops: Operations) -> None:
    await fails(errno.EEXIST, mkdir(ops, DOM, "s1"))
    await fails(errno.EEXIST, mkdir(ops, f"{DOM}/.disk", "t1"))
    assert "already exists" in (await status(ops))["last_error"]


async def test_failed_rmdir_and_apply_answer_the_engines_errno(
        ops: Operations, fake: FakeQueries) -> None:
    fake.fail_next("vm_snapshot_delete", QemuError("qemu-img: snapshot delete failed"))
    await fails(errno.EIO, rmdir(ops, DOM, "s1"))
    assert (await walk(ops, f"{DOM}/s1")).st_ino
    fake.fail_next("vm_snapshot_apply", NoSpace("no room for .undo"))
    await fails(errno.ENOSPC, write_apply(ops, "s1", b"running"))
    assert (await status(ops))["last_error"] == "no room for .undo"
    # A VM snapshot's disk snapshot is not in .disk: it goes with the VM snapshot only.
    await fails(errno.ENOENT, rmdir(ops, f"{DOM}/.disk", "s1"))
    await fails(errno.ENOENT, rmdir(ops, DOM, "nosuch"))
    await fails(errno.ENOENT, rmdir(ops, f"{DOM}/.disk", "nosuch"))


async def test_a_view_that_cannot_be_served_is_an_error_not_a_crash(
        ops: Operations, fake: FakeQueries) -> None:
    ino = (await walk(ops, f"{DOM}/s1/disks/vda.img")).st_ino
    fake.fail_next("open_disk_view", QemuError("qemu-nbd: cannot open"))
    await fails(errno.EIO, ops.open(ino, os.O_RDONLY, None))
    fake.serving_views = False
    await fails(errno.EINVAL, ops.open(ino, os.O_RDONLY, None))


async def test_every_other_change_is_erofs(ops: Operations, fake: FakeQueries) -> None:
    dom = (await walk(ops, DOM)).st_ino
    snap = (await walk(ops, f"{DOM}/s1")).st_ino
    info = (await walk(ops, f"{DOM}/s1/info.json")).st_ino
    view = (await walk(ops, f"{DOM}/s1/disks/vda.img")).st_ino
    fields = SimpleNamespace(update_mode=True, update_uid=False, update_gid=False,
                             update_size=False, update_atime=False, update_mtime=False)
    attr = SimpleNamespace(st_mode=0o777, st_size=0)
    size_only = SimpleNamespace(**{**vars(fields), "update_mode": False, "update_size": True})
    refused = [
        ops.create(snap, b"new", 0o644, os.O_WRONLY, None),
        ops.create(dom, b"new", 0o644, os.O_WRONLY, None),
        ops.mknod(snap, b"fifo", stat.S_IFIFO | 0o644, 0, None),
        ops.symlink(dom, b"link", b"s1", None),
        ops.link(info, snap, b"hard", None),
        ops.unlink(snap, b"info.json", None),
        ops.unlink(dom, b".status", None),
        ops.rename(dom, b"s1", dom, b"renamed", 0, None),
        ops.rename(snap, b"info.json", snap, b"x.json", 0, None),
        ops.setattr(info, attr, fields, None, None),
        ops.setattr(info, SimpleNamespace(st_size=3), size_only, None, None),
        ops.setattr(info, attr, size_only, None, None),
        ops.open(info, os.O_WRONLY, None),
        ops.open(info, os.O_RDONLY | os.O_TRUNC, None),
        ops.open(view, os.O_RDWR, None),
        ops.mkdir(snap, b"sub", 0o755, None),
        ops.mkdir((await walk(ops, f"{DOM}/s1/disks")).st_ino, b"x", 0o755, None),
        ops.mkdir(ROOT, b"newdomain", 0o755, None),
        ops.rmdir(dom, b".disk", None),
    ]
    fake.domains[DOM].last_error = "an earlier, real failure"
    for call in refused:
        await fails(errno.EROFS, call)
    assert (await status(ops))["last_error"] == "an earlier, real failure"
    assert sorted(fake.domains[DOM].snapshots) == ["s1", "s2"]


async def test_rmdir_waits_for_open_files_then_is_ebusy(
        ops: Operations, fake: FakeQueries, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "RELEASE_GRACE", 0.1)
    for parent, name, path in ((DOM, "s1", f"{DOM}/s1/info.json"),
                               (DOM, "s1", f"{DOM}/s1/disks/vdb.img"),
                               (f"{DOM}/.disk", "t1", f"{DOM}/.disk/t1/vda.img")):
        opened = await ops.open((await walk(ops, path)).st_ino, os.O_RDONLY, None)
        try:
            await fails(errno.EBUSY, rmdir(ops, parent, name))
            assert "1 of its files are open" in (await status(ops))["last_error"]
            assert await walk(ops, f"{parent}/{name}")
        finally:
            await ops.release(opened.fh)

    # A release that arrives while rmdir waits (close() returns before RELEASE) lets it through.
    opened = await ops.open((await walk(ops, f"{DOM}/s1/save")).st_ino, os.O_RDONLY, None)

    async def release_soon() -> None:
        await trio.sleep(0.02)
        await ops.release(opened.fh)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_soon)
        await rmdir(ops, DOM, "s1")
    await fails(errno.ENOENT, walk(ops, f"{DOM}/s1"))


def test_modes_leave_permission_to_the_kernel() -> None:
    """EACCES is the kernel's (default_permissions): the modes must say who may do what."""
    assert "default_permissions" in _options(allow_other=True)


async def test_secrets_are_root_only_and_apply_write_only(ops: Operations) -> None:
    for path, mode in ((f"{DOM}/s1/save", 0o400), (f"{DOM}/s1/apply", 0o200),
                       (f"{DOM}/s1/disks/vda.img", 0o400), (f"{DOM}/.disk/t1/vda.img", 0o400),
                       (f"{DOM}/.undo/save", 0o400), (f"{DOM}/s1/info.json", 0o444)):
        assert perm(await walk(ops, path)) == mode, path


# -- bookkeeping ----------------------------------------------------------------------------


async def test_lookup_counts_follow_lookup_readdir_and_forget(
        ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    dom = await ops.lookup(ROOT, DOM.encode(), None)
    await ops.lookup(ROOT, DOM.encode(), None)
    assert ops.inodes.count(dom.st_ino) == 2

    listing = Listing(room=1)   # the kernel's buffer is full after one entry
    monkeypatch.setattr(pyfuse3, "readdir_reply", listing.reply)
    fh = await ops.opendir(dom.st_ino, None)
    await ops.readdir(fh, 0, None)
    (name, attr, next_id), = listing.entries
    assert ops.inodes.count(attr.st_ino) == 1
    size_before = len(ops.inodes)
    listing.room = 2
    await ops.readdir(fh, next_id, None)   # resumes after the first entry
    assert listing.entries[1][0] != name
    assert len(ops.inodes) == size_before + 1   # the entry refused for room was not kept
    await ops.releasedir(fh)

    await ops.forget([(dom.st_ino, 2), (attr.st_ino, 1)])
    assert ops.inodes.count(dom.st_ino) == 0
    await fails(errno.ENOENT, ops.getattr(attr.st_ino, None))
    # forget never raises, whatever it is told.
    await ops.forget([(123456, 1), (dom.st_ino, 5), (ROOT, 1)])
    assert (await ops.getattr(ROOT, None)).st_ino == ROOT


def test_inodes_keep_a_number_while_the_kernel_holds_it() -> None:
    inodes = Inodes()
    a = inodes.inode(("d", "a"))
    assert inodes.inode(("d", "a")) == a and inodes.path(a) == ("d", "a")
    inodes.remember(a)
    inodes.remember(a)
    inodes.forget(a, 1)
    assert inodes.path(a) == ("d", "a")
    inodes.forget(a, 1)
    with pytest.raises(NotFound):
        inodes.path(a)
    assert inodes.inode(("d", "a")) != a   # a new life, a new number


async def test_an_unexpected_exception_is_eio_and_logged(
        ops: Operations, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, allow_errors: None) -> None:
    async def broken(path: Any) -> Any:
        raise RuntimeError("a bug")
    monkeypatch.setattr(ops.tree, "get", broken)
    await fails(errno.EIO, ops.getattr(ROOT, None))
    await fails(errno.EIO, ops.lookup(ROOT, b"x", None))
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and "a bug" in (logged[0].exc_text or "")


async def test_statfs_and_xattrs_answer(ops: Operations) -> None:
    st = await ops.statfs(None)
    assert (st.f_blocks, st.f_bavail, st.f_bsize) == (1000, 400, 4096)
    assert st.f_namemax == 64 and st.f_ffree == 0
    dom = (await walk(ops, DOM)).st_ino
    await fails(errno.ENOSYS, ops.getxattr(dom, b"user.x", None))
    assert await ops.listxattr(dom, None) == []
    await fails(errno.ENOTSUP, ops.setxattr(dom, b"user.x", b"1", None))
    await fails(pyfuse3.ENOATTR, ops.removexattr(dom, b"user.x", None))
