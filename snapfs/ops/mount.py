"""``snapfs mount``: the tree's life from mount to unmount.

    pyfuse3.init (mount; errors reach the caller's terminal)
      -> daemonize unless --foreground (log to <run dir>/mount.log)
      -> trio.run: disk views (reaping what a crashed tree left), the catalog's
         watch, READY=1 to $NOTIFY_SOCKET, serve until unmounted or signalled
      -> SIGTERM/SIGINT/SIGHUP: pyfuse3.terminate(); requests in progress finish
      -> the disk views' qemu-nbd servers stopped
      -> pyfuse3.close(unmount=True)

A crash leaves the mount in place (``close(unmount=False)``), as borg does: an
empty directory where snapshots were could make a mirroring tool delete its
copies; ``fusermount3 -u`` clears the dead mount.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from ..config import Dirs
from ..diskview import DiskViews
from ..engine import Engine
from ..errors import NotFound, SnapfsError
from .fs import Operations
from .model import Tree

__all__ = ["mount", "notify"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READ_AHEAD_KB = 8192
"""The mount's read-ahead: a FUSE mount starts at 128 KiB, and sends sequential
reads of save images and disk views in requests that big. With an 8 MiB window
they come in libfuse's largest requests, 1 MiB, eight at a time: the tree reads
a cold file with eight worker threads at once (a cold 1 GiB view: 0.71x of
qemu-img convert -l with a 4 MiB window, 0.98x with 8 MiB)."""


def notify(message: str) -> None:
    """Tell systemd ``message`` (``READY=1``...) when it started us with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        logger.warning("cannot notify systemd at %s: %s", address, err)


def _options(allow_other: bool) -> set[str]:
    # default_permissions always: the kernel checks modes (save 0400, apply 0200),
    # so with allow_other other users can browse but not read memory or revert.
    options = set(pyfuse3.default_options) | {"default_permissions", "fsname=snapfs",
                                              "subtype=snapfs", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        if not mountpoint.is_dir():
            raise NotFound(f"mount point {mountpoint} is not a directory")
    except OSError as err:
        raise SnapfsError(f"mount point {mountpoint}: {err.strerror} (a dead mount? "
                          f"`fusermount3 -u {mountpoint}` clears it)") from None
    if os.path.ismount(mountpoint):
        raise SnapfsError(f"{mountpoint} is already a mount point")
    inside = _snapfs_mount_above(mountpoint)
    if inside:
        # The new tree would hide part of the old one (a domain's directory,
        # say) from everyone who browses it.
        raise SnapfsError(f"{mountpoint} is inside the snapfs tree mounted on {inside}; "
                          "mount it elsewhere")


def _snapfs_mounts() -> list[tuple[str, str]]:
    """Every snapfs tree mounted here: (mount point, ``major:minor``), in mount order."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) != 2 or not fields[1].startswith("fuse.snapfs "):
            continue
        parts = fields[0].split()
        # mountinfo escapes spaces and the like as octal.
        mounts.append((parts[4].encode().decode("unicode_escape"), parts[2]))
    return mounts


def _snapfs_mount_above(path: Path) -> str:
    """The snapfs tree ``path`` lies in, if any ("" otherwise)."""
    target = os.path.realpath(path)
    for point, _ in _snapfs_mounts():
        if target == point or target.startswith(point.rstrip("/") + "/"):
            return point
    return ""


def _raise_read_ahead(target: str) -> None:
    """Raise the read-ahead of the tree mounted on ``target``, once the kernel has the
    answer to INIT (it lowers the read-ahead to what INIT offered); ``target`` is
    a real path: resolving one would stat the tree from its own serving thread."""
    devices = [device for point, device in _snapfs_mounts() if point == target]
    device = devices[-1] if devices else ""
    knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        if device and int(knob.read_text()) < READ_AHEAD_KB:
            knob.write_text(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as err:
        # Only root may; reads still work, in smaller requests.
        logger.info("cannot raise the read-ahead of %s (%s): %s", target, knob, err)


def _open_log(log: Path) -> int:
    """The detached tree's log, opened before anything is mounted so that a refusal
    reaches the caller (a symlink planted in its place is refused, not followed)."""
    try:
        return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                       | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise SnapfsError(f"cannot open the tree's log {log}: {err.strerror}") from None


def _daemonize(out: int) -> None:
    """Detach from the terminal; stdout and stderr (faulthandler too) go to ``out``."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def mount(dirs: Dirs, mountpoint: Path, *, foreground: bool = False,
          allow_other: bool = False) -> int:
    """Mount the tree at ``mountpoint`` and serve it until it is unmounted.

    Without ``foreground`` this returns in the caller once the tree is mounted,
    and a detached process serves it. :raise SnapfsError: when it cannot mount.
    """
    mountpoint = mountpoint.absolute()
    _check_mountpoint(mountpoint)
    dirs.ensure()
    log = -1 if foreground else _open_log(dirs.mount_log)
    engine = Engine(dirs)
    operations = Operations(Tree(engine), on_init=partial(_raise_read_ahead,
                                                          os.path.realpath(mountpoint)))
    try:
        pyfuse3.init(operations, str(mountpoint), _options(allow_other))
    except RuntimeError as err:
        raise SnapfsError(f"cannot mount on {mountpoint}: {err} (see the fuse message above)") \
            from None
    if not foreground:
        # No thread may run before the fork: the engine starts its QMP thread lazily.
        _daemonize(log)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logger.info("snapfs mounted on %s (pid %d)", mountpoint, os.getpid())
    try:
        trio.run(_serve, engine, str(mountpoint))
    except BaseException:
        logger.critical("the tree on %s crashed; it stays mounted but dead: "
                        "`fusermount3 -u %s` clears it", mountpoint, mountpoint, exc_info=True)
        pyfuse3.close(unmount=False)
        return 1
    pyfuse3.close(unmount=True)
    logger.info("snapfs unmounted from %s", mountpoint)
    return 0


async def _serve(engine: Engine, mountpoint: str) -> None:
    # Made here, in the serving process and its Trio run: the views' qemu-nbd
    # servers are its children and die with it (see diskview).
    async with DiskViews(engine.dirs.run) as views:
        engine.views = views
        try:
            await _serve_tree(engine, mountpoint)
        finally:
            engine.views = None


async def _serve_tree(engine: Engine, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, mountpoint)
        # A long-lived reader: the catalog follows the domains' changes with
        # inotify instead of checking its caches on every request.
        await nursery.start(engine.catalog.watch)
        # A deleted snapshot's save image is unlinked after the rmdir has returned:
        # freeing a memory-sized file's cached pages takes ~0.3 s a GiB.
        engine.discard = lambda path: nursery.start_soon(_unlink, path)
        # Operations a killed snapfs process left half done are settled before
        # anyone can see their traces in the tree.
        for name in engine.domain_names():
            try:
                await engine.recover(name)
            except SnapfsError as err:
                logger.error("domain %s: recovery at mount: %s", name, err)
        notify(f"READY=1\nSTATUS=serving {mountpoint}")
        try:
            await pyfuse3.main()
        finally:
            engine.discard = None
        nursery.cancel_scope.cancel()


async def _unlink(path: Path) -> None:
    try:
        await trio.to_thread.run_sync(path.unlink)
    except OSError as err:
        logger.warning("%s: %s (the next operation on its domain removes it)", path, err)


async def _stop_on_signal(mountpoint: str, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping:
                logger.warning("%s again: still finishing the requests in progress", name)
                continue
            stopping = True
            logger.info("%s: unmounting %s", name, mountpoint)
            notify("STOPPING=1")
            # Ends pyfuse3.main() once the requests in progress (a mkdir that
            # is saving memory, say) have answered.
            pyfuse3.terminate()

