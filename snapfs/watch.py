"""Which domains changed, by anyone: when the catalog may answer without looking.

Without a watch, the ``Catalog`` checks each answer against its key before
giving it (catalog's docstring): a stat of the definition, of the store dir,
of each disk image, most of them on a worker thread, on every call. ``find``
over a domain with a thousand snapshots asks tens of thousands of times, and
those checks were most of its time. A mounted tree is one long-lived process,
so it has the kernel say when something changed instead: inotify on what each
fact is read from. Polling would be the stats again; fanotify needs
CAP_SYS_ADMIN and sees a whole file system. What is watched, per domain (the
paths come from the catalog: the definitions' and the stores' own modules
name them):

    its definition's directory      a definition made, rewritten or removed:
                                    the store and the images may be others now
    the directory of the stores     its store made (its first snapshot) or
                                    removed
    its store                       info files, configs, save images, current:
                                    made, written, renamed, removed, chmod'ed
    each of its disk images         written (a snapshot taken or deleted, a
                                    guest's write), chmod'ed, linked or
                                    unlinked, replaced, removed; a regular
                                    file only (a block device is written
                                    through other inodes than its node's)

A running guest writes its images all the time, and an event per write takes
a core. So at its images' first event a domain *rests*: it is not followed
for RETRY seconds (its images not watched, its keys checked), then followed
again when next asked about.

Every change gives the domain a new *generation*, a number never handed out
before. Whatever the catalog read after it was told generation g is the truth
for as long as the domain's generation is still g: a change is queued by the
kernel before the call that made it returns, and read here at the next turn
of trio's loop (a request that came in the same turn may still be answered
from before it; the kernel's own caches of a mounted tree keep answers for
longer). A domain the watch does not follow has no generation (None): one
resting, a definition that cannot be loaded, a missing image, inotify out of
watches, events lost, the watch not running. The catalog checks its keys.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import trio

from .errors import ConfigError, SnapfsError
from .inotify import (
    CHANGED,
    DIR_GONE,
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_MODIFY,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
)

__all__ = ["DomainWatch", "Sources"]

logger = logging.getLogger(__name__)

# A disk image: written, chmod'ed or (un)linked, removed.
IMAGE = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | DIR_GONE
DIRECTORY = CHANGED | DIR_GONE | IN_ONLYDIR
RETRY = 1.0     # seconds a domain rests, or before one that could not be followed is tried


class Sources(NamedTuple):
    """What a domain's facts are read from."""

    definition: Path
    store: Path
    images: tuple[Path, ...]


@dataclass
class _Domain:
    sources: Sources | None             # None: its definition could not be loaded
    generation: int
    armed_at: float                     # time.monotonic()
    blind: bool = False                 # resting, or a change could go unseen: no generation
    store_wd: int | None = None         # None while the store does not exist
    wds: set[int] = field(default_factory=set)


def _regular(path: Path) -> bool:
    # A block device is written through other inodes than its node's: unseen.
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class DomainWatch:
    """Generations of domains; ``sources(domain)`` says where a domain's facts are
    read from (raising ``SnapfsError`` when it is not properly defined). ``run``
    reads the events; without it running, no domain has a generation."""

    def __init__(self, sources: Callable[[str], Sources]) -> None:
        self._sources = sources
        self._inotify: Inotify | None = None
        self._serial = itertools.count(1)
        self._domains: dict[str, _Domain] = {}
        self._by_wd: dict[int, set[str]] = {}
        self._parents: dict[int, Path] = {}     # definitions' and stores' directories

    def generation(self, domain: str) -> int | None:
        """A number that changes whenever ``domain`` does; None: not followed."""
        watched = self._domains.get(domain)
        if watched is None or (watched.blind and time.monotonic() - watched.armed_at > RETRY):
            watched = self._arm(domain)
        return None if watched is None or watched.blind else watched.generation

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the changes until cancelled; started once inotify is set up."""
        try:
            self._inotify = Inotify()
        except OSError as err:      # fs.inotify.max_user_instances, say
            logger.warning("cannot watch for changes (%s): every answer is checked", err)
            task_status.started()
            return
        try:
            task_status.started()
            while True:
                for event in await self._inotify.events():
                    try:
                        self._handle(event)
                    except Exception:
                        # A bug: logged, and every domain armed again (new
                        # generations) rather than a change missed or the mount ended.
                        logger.exception("the watch failed on %r; following every domain "
                                         "anew", event)
                        self._forget_all()
        finally:
            self._forget_all()
            inotify, self._inotify = self._inotify, None
            inotify.close()

    # -- watching --------------------------------------------------------------------

    def _arm(self, domain: str) -> _Domain | None:
        """Start following ``domain``; None when it cannot be (not running, not defined)."""
        self._forget(domain)
        if self._inotify is None:
            return None
        try:
            sources = self._sources(domain)
        except ConfigError:
            # Broken: remembered as blind, so it is not parsed again on every question.
            self._domains[domain] = _Domain(None, 0, time.monotonic(), blind=True)
            return None
        except SnapfsError:
            return None     # not defined: any name can be asked about, none is remembered
        watched = self._domains[domain] = _Domain(sources, next(self._serial), time.monotonic())
        new_parent = False
        for parent in (sources.definition.parent, sources.store.parent):
            if parent not in self._parents.values():
                wd = self._add(domain, parent, DIRECTORY, parent=True)
                new_parent |= wd is not None
        watched.blind |= sources.definition.parent not in self._parents.values() or \
            sources.store.parent not in self._parents.values()
        for image in sources.images:
            watched.blind |= not _regular(image) or self._add(domain, image, IMAGE) is None
        watched.store_wd = self._add(domain, sources.store, DIRECTORY, missing_ok=True)
        if new_parent and not watched.blind:
            # The definition could have changed before its directory was watched.
            try:
                watched.blind = self._sources(domain) != sources
            except SnapfsError:
                watched.blind = True
        return watched

    def _add(self, domain: str, path: Path, mask: int, parent: bool = False,
             missing_ok: bool = False) -> int | None:
        assert self._inotify is not None
        try:
            wd = self._inotify.add(path, mask)
        except (FileNotFoundError, NotADirectoryError) as err:
            if not missing_ok:
                logger.debug("cannot watch %s: %s; %s is checked by stat", path, err, domain)
            return None     # a store its first snapshot makes: its directory sees that
        except OSError as err:      # out of watches (fs.inotify.max_user_watches)
            logger.warning("cannot watch %s: %s; %s is checked by stat", path, err, domain)
            return None
        if parent:
            self._parents[wd] = path
        else:
            self._domains[domain].wds.add(wd)
            self._by_wd.setdefault(wd, set()).add(domain)
        return wd

    def _bump(self, watched: _Domain) -> None:
        watched.generation = next(self._serial)

    def _forget(self, domain: str) -> None:
        """Stop following ``domain``: armed again, with a new generation, when next asked."""
        watched = self._domains.pop(domain, None)
        for wd in watched.wds if watched is not None else ():
            domains = self._by_wd.get(wd, set())
            domains.discard(domain)
            if not domains and self._inotify is not None:
                self._by_wd.pop(wd, None)
                self._inotify.remove(wd)

    def _rest(self, domain: str) -> None:
        """Not followed for RETRY seconds (see the module docstring)."""
        watched = self._domains[domain]
        self._forget(domain)
        self._domains[domain] = _Domain(watched.sources, 0, time.monotonic(), blind=True)

    def _forget_all(self) -> None:
        for domain in list(self._domains):
            self._forget(domain)
        for wd in list(self._parents):
            del self._parents[wd]
            if self._inotify is not None:
                self._inotify.remove(wd)

    def _handle(self, event: Event) -> None:
        if event.mask & IN_Q_OVERFLOW:
            logger.info("inotify queue overflowed: every domain counts as changed")
            self._forget_all()
            return
        gone = bool(event.mask & DIR_GONE) and not event.name
        for domain in list(self._by_wd.get(event.wd, ())):
            watched = self._domains[domain]
            self._bump(watched)
            if event.wd != watched.store_wd:
                self._rest(domain)     # an image: replaced, maybe; written, maybe again
            elif gone:
                # Its store was removed: followed again when its directory sees it back.
                watched.store_wd = None
                watched.wds.discard(event.wd)
                self._by_wd.pop(event.wd, None)
                if self._inotify is not None:
                    self._inotify.remove(event.wd)
        parent = self._parents.get(event.wd)
        if parent is None:
            return
        if gone:
            # A directory every domain depends on: start over.
            self._forget_all()
            return
        for domain, watched in list(self._domains.items()):
            if watched.sources is None:
                continue    # tried again after RETRY
            definition, store, _ = watched.sources
            if definition.parent == parent and definition.name == event.name:
                self._forget(domain)
            elif store.parent == parent and store.name == event.name:
                self._bump(watched)
                if watched.store_wd is None:
                    watched.store_wd = self._add(domain, store, DIRECTORY, missing_ok=True)
