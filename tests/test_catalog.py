"""The catalog under a watch, over real files: answers kept while nothing changes,
every change by another process seen (no QEMU; qemu-img for the disk tables).

The catalog's key policy without a watch (the CLI's) is covered through the
engine by ``test_engine.py`` and the tree tests.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from snapfs import catalog as catalog_module
from snapfs import watch
from snapfs.catalog import Catalog
from snapfs.config import Dirs
from snapfs.domains import define_domain
from snapfs.errors import NotFound
from snapfs.store import UNDO, Store, VmSnapshot
from snapfs.watch import DomainWatch, Sources

DOM = "cat"


class Reads:
    """What the catalog read or looked at, by kind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self._patch(monkeypatch, Store, "list")
        self._patch(monkeypatch, Store, "read")
        self._patch(monkeypatch, catalog_module, "_read_table")
        self._patch(monkeypatch, catalog_module, "stat_key")
        self._patch(monkeypatch, catalog_module, "load_domain")
        self._patch(monkeypatch, trio.to_thread, "run_sync", "thread")

    def _patch(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
               label: str = "") -> None:
        real = getattr(owner, name)
        counts = self.counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[label or name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    def clear(self) -> None:
        self.counts.clear()


def _image(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


def _define(dirs: Dirs, tmp: Path, images: list[Path], name: str = DOM) -> None:
    toml = tmp / f"{name}-source.toml"
    disks = "".join(f'\n[[disks]]\ndev = "vd{chr(97 + i)}"\nfile = "{image}"\n'
                    for i, image in enumerate(images))
    toml.write_text(f'name = "{name}"\nmemory = "32M"\n{disks}')
    define_domain(dirs, toml)


def _snap(name: str, created: int = 1_700_000_000, save: Path | None = None) -> VmSnapshot:
    return VmSnapshot(name=name, creation_time=created, save=save, state="shutoff", parent="",
                      disks=())


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    dirs = Dirs(tmp_path / "cfg", tmp_path / "st", tmp_path / "run")
    dirs.ensure()
    _define(dirs, tmp_path, [_image(tmp_path / "a.qcow2"), _image(tmp_path / "b.qcow2")])
    # Defined a while ago, as a domain usually is: its key is settled (catalog.SETTLED).
    past = time.time() - 10
    os.utime(dirs.domains / f"{DOM}.toml", (past, past))
    return dirs


@pytest.fixture
async def watched(dirs: Dirs) -> AsyncIterator[Catalog]:
    catalog = Catalog(dirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(catalog.watch)
        yield catalog
        nursery.cancel_scope.cancel()


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """``check`` comes true soon: the watch saw the change (a missed one never shows)."""
    with trio.fail_after(5):
        while not await check():
            await trio.sleep(0.001)


async def _everything(catalog: Catalog, name: str = DOM) -> None:
    catalog.definition(name)
    await catalog.checked_snapshots(name)
    await catalog.disk_table(name)
    try:
        await catalog.stored(name, UNDO)
    except NotFound:
        pass


async def test_a_domain_that_does_not_change_is_answered_without_a_look(
        watched: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    store = watched.store(DOM)
    store.write(_snap("s1", save=store.save_path("s1")), "config")
    store.save_path("s1").write_bytes(b"memory")
    await wait_all_tasks_blocked()      # the watch has seen those: the reads are current
    reads = Reads(monkeypatch)
    await _everything(watched)
    first = await watched.checked_snapshots(DOM)
    assert list(first) == ["s1"]
    size = os.stat(store.save_path("s1"))
    assert await watched.save_size(DOM, store.save_path("s1")) == (6, size.st_blocks)
    assert reads.counts["list"] == 1 and reads.counts["_read_table"] == 1
    reads.clear()
    for _ in range(3):
        await _everything(watched)
        assert await watched.checked_snapshots(DOM) is first
        assert await watched.save_size(DOM, store.save_path("s1")) == (6, size.st_blocks)
    assert not reads.counts, reads.counts    # no read, no stat, no thread


async def test_changes_by_another_process_are_seen(
        watched: Catalog, dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "RETRY", 0.05)
    store = watched.store(DOM)
    assert await watched.snapshots(DOM) == {}       # no store yet: its first snapshot makes it
    reads = Reads(monkeypatch)
    await _everything(watched)

    async def listed() -> list[str]:
        return list(await watched.snapshots(DOM))
    # Files written, renamed, removed in the store.
    store.write(_snap("s1"), "config")
    await _until(lambda: _is(listed, ["s1"]))
    store.write(_snap("s2", 1_700_000_001), "config")
    await _until(lambda: _is(listed, ["s1", "s2"]))
    store.rename("s1", "s0")
    await _until(lambda: _is(listed, ["s0", "s2"]))     # by creation time
    store.remove("s2")
    await _until(lambda: _is(listed, ["s0"]))

    # .undo, which the list leaves out.
    async def undo() -> bool:
        try:
            return (await watched.stored(DOM, UNDO)).name == UNDO
        except NotFound:
            return False
    assert not await undo()
    store.write(_snap(UNDO), "config")
    await _until(undo)

    # A save image written again.
    save = store.save_path("s0")
    save.write_bytes(b"x" * 10)
    assert (await watched.save_size(DOM, save))[0] == 10
    save.write_bytes(b"x" * 20)

    async def size() -> int:
        return (await watched.save_size(DOM, save))[0]
    await _until(lambda: _is(size, 20))

    # An image: a disk snapshot taken by qemu-img. The domain rests (its keys are
    # checked) for watch.RETRY, then is followed again: no look.
    image = watched.definition(DOM).disks[0].file
    subprocess.run(["qemu-img", "snapshot", "-c", "by-qemu-img", str(image)], check=True)

    async def tags() -> list[str]:
        return sorted((await watched.disk_table(DOM)).tags)
    await _until(lambda: _is(tags, ["by-qemu-img"]))
    await _until(lambda: _is(lambda: _looks(watched, reads), 0))
    # Its times touched: that too is a change.
    os.utime(image, (1, 1))
    await _until(lambda: _is(lambda: _read_tables(watched, reads), 1))

    # The definition: now with one disk only, and a store of its own.
    old_uuid = watched.definition(DOM).uuid
    (dirs.domains / f"{DOM}.toml").unlink()
    _define(dirs, tmp_path, [_image(tmp_path / "c.qcow2")])

    async def uuid() -> str:
        await trio.lowlevel.checkpoint()
        return watched.definition(DOM).uuid
    await _until(lambda: _not(uuid, old_uuid))
    assert await watched.snapshots(DOM) == {} and await tags() == []
    assert list((await watched.disk_table(DOM)).sizes) == ["vda"]


async def _is(value: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    return bool(await value() == expected)


async def _not(value: Callable[[], Awaitable[Any]], unexpected: Any) -> bool:
    return bool(await value() != unexpected)


async def _read_tables(catalog: Catalog, reads: Reads) -> int:
    reads.clear()
    await catalog.disk_table(DOM)
    return reads.counts["_read_table"]


async def _looks(catalog: Catalog, reads: Reads) -> int:
    """How many stats and thread hops answering cost."""
    reads.clear()
    await catalog.disk_table(DOM)
    await catalog.snapshots(DOM)
    return reads.counts["stat_key"] + reads.counts["thread"]


async def test_a_store_removed_and_made_again_is_followed(watched: Catalog) -> None:
    store = watched.store(DOM)
    store.write(_snap("s1"), "config")
    assert list(await watched.snapshots(DOM)) == ["s1"]
    away = store.dir.with_name("away")
    store.dir.rename(away)

    async def listed() -> list[str]:
        return list(await watched.snapshots(DOM))
    await _until(lambda: _is(listed, []))
    away.rename(store.dir)
    await _until(lambda: _is(listed, ["s1"]))
    store.write(_snap("s2", 1_700_000_001), "config")   # followed inside again
    await _until(lambda: _is(listed, ["s1", "s2"]))


async def test_the_verbs_of_this_process_drop_what_was_kept(watched: Catalog) -> None:
    store = watched.store(DOM)
    store.write(_snap("s1"), "config")
    assert list(await watched.snapshots(DOM)) == ["s1"]
    store.remove("s1")
    watched.changed(DOM)        # as the engine does after each verb: at once
    assert await watched.snapshots(DOM) == {}


async def test_once_the_watch_stops_the_keys_are_checked_again(dirs: Dirs) -> None:
    catalog = Catalog(dirs)
    store = catalog.store(DOM)
    store.write(_snap("s1"), "config")
    async with trio.open_nursery() as nursery:
        await nursery.start(catalog.watch)
        assert list(await catalog.snapshots(DOM)) == ["s1"]
        nursery.cancel_scope.cancel()
    store.write(_snap("s2", 1_700_000_001), "config")     # unseen by any watch

    async def listed() -> list[str]:
        return list(await catalog.snapshots(DOM))
    await _until(lambda: _is(listed, ["s1", "s2"]))


async def test_a_domain_the_watch_cannot_follow_is_checked_by_its_keys(
        watched: Catalog, dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its image is a block device (written through other inodes than its node's).
    monkeypatch.setattr(watch, "_regular", lambda path: False)
    _define(dirs, tmp_path, [_image(tmp_path / "d.qcow2")], name="dev")
    store = watched.store("dev")
    store.write(_snap("s1"), "config")
    assert list(await watched.snapshots("dev")) == ["s1"]
    reads = Reads(monkeypatch)
    await watched.snapshots("dev")
    assert reads.counts["thread"] == 1      # the store's stat
    # Not defined, or not properly: asked each time, parsed at most once a second.
    (dirs.domains / "broken.toml").write_text("name = [")
    assert watched.defined("broken") and not watched.defined("nosuch")
    reads.clear()
    for _ in range(3):
        assert watched.defined("broken")
    assert reads.counts["load_domain"] == 0


# -- the watch alone ---------------------------------------------------------------------


async def _bumped(changes: DomainWatch, domain: str, change: Callable[[], object]) -> None:
    before = changes.generation(domain)
    change()
    with trio.fail_after(5):
        while changes.generation(domain) == before:
            await trio.sleep(0.001)


async def _rested(changes: DomainWatch, domain: str, change: Callable[[], object]) -> None:
    """An image changed: the domain rests (no generation), then is followed anew."""
    await _bumped(changes, domain, change)
    assert changes.generation(domain) is None
    await trio.sleep(watch.RETRY * 2)
    assert changes.generation(domain) is not None


async def test_the_watch_sees_stores_images_and_definitions_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "RETRY", 0.05)
    stores, definitions, image = tmp_path / "snapshots", tmp_path / "domains", tmp_path / "i"
    stores.mkdir()
    definitions.mkdir()
    image.write_bytes(b"qcow2")
    store, definition = stores / "uuid-1", definitions / "d.toml"
    definition.write_text("d")

    def sources(domain: str) -> Sources:
        if domain != "d":
            raise NotFound(f"no domain named {domain!r}")
        return Sources(definition, store, (image,))

    changes = DomainWatch(sources)
    assert changes.generation("d") is None      # not running: nothing followed
    async with trio.open_nursery() as nursery:
        await nursery.start(changes.run)
        assert changes.generation("d") is not None and changes.generation("nosuch") is None
        await _bumped(changes, "d", store.mkdir)     # its first snapshot makes it
        info = store / "snapshotdata-a.xl"
        await _bumped(changes, "d", lambda: info.write_text("made"))
        await _bumped(changes, "d", lambda: info.rename(store / "snapshotdata-b.xl"))
        await _bumped(changes, "d", (store / "snapshotdata-b.xl").unlink)
        await _rested(changes, "d", lambda: image.open("ab").write(b"written"))
        await _bumped(changes, "d", lambda: definition.write_text("x"))
        await _bumped(changes, "d", lambda: store.rename(tmp_path / "away"))
        await _bumped(changes, "d", lambda: (tmp_path / "away").rename(store))
        await _bumped(changes, "d", lambda: (store / "current").write_text("b"))
        replaced = tmp_path / "new-image"
        replaced.write_bytes(b"other")
        await _rested(changes, "d", lambda: replaced.rename(image))
        await _rested(changes, "d", lambda: image.open("ab").write(b"the new one"))
        nursery.cancel_scope.cancel()
    assert changes.generation("d") is None
