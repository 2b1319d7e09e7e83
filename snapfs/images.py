"""Disk images through ``qemu-img``: format, internal snapshots of closed images.

Running domains' disks are changed through QMP (engine); ``qemu-img`` works on
closed images, and reads open ones with ``-U`` (force-share).
"""

import json
import logging
from pathlib import Path
from typing import Any

import trio

from . import trace
from .config import qemu_opt
from .errors import NotFound, QemuError, StateError
from .tables import DiskSnapshot, DiskTable

__all__ = ["DiskSnapshot", "DiskTable", "qemu_opt", "image_info", "stable_info",
           "list_snapshots", "snapshot_create", "snapshot_delete", "snapshot_apply", "run_tool"]

logger = logging.getLogger(__name__)


async def run_tool(args: list[str], what: str) -> str:
    """Run a QEMU tool without a shell; its stderr becomes the error message."""
    trace.count(" ".join(args[:2]) if args[0] == "qemu-img" else args[0])
    try:
        result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise QemuError(f"{what}: {args[0]} is not installed") from None
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise QemuError(f"{what}: {reason[-1] if reason else f'exit status {result.returncode}'}")
    return result.stdout.decode(errors="replace")


async def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of a possibly open image. :raise NotFound: when it is absent."""
    if not path.exists():
        raise NotFound(f"disk image {path} does not exist")
    out = await run_tool(["qemu-img", "info", "-U", "--output=json", "--", str(path)],
                         f"reading {path}")
    info: dict[str, Any] = json.loads(out)
    return info


TORN_READ_TRIES = 20


async def stable_info(path: Path) -> dict[str, Any]:
    """``image_info`` of an image QEMU may be changing, with a whole snapshot table.

    A read racing QEMU's update of the table can fail, or return entries with an
    empty id or name (seen in 5% of reads under a create/delete loop): read again.
    """
    for attempt in range(TORN_READ_TRIES):
        try:
            info = await image_info(path)
        except NotFound:
            raise
        except QemuError:
            if attempt == TORN_READ_TRIES - 1:
                raise
        else:
            if all(s.get("id") and s.get("name") for s in info.get("snapshots", [])):
                return info
        await trio.sleep(0.005 * (attempt + 1))
    raise QemuError(f"the snapshot table of {path} kept changing while it was read")


async def list_snapshots(dev: str, path: Path) -> list[DiskSnapshot]:
    info = await stable_info(path)
    return [DiskSnapshot.from_qemu(dev, s) for s in info.get("snapshots", [])]


async def _snapshot_id(path: Path, tag: str, table: list[DiskSnapshot] | None) -> str:
    """The id of the image's snapshot named ``tag``. ``qemu-img snapshot -a`` looks a
    snapshot up by id before name, so a name of digits (the default name is epoch
    seconds) could be another snapshot's id; by its own id, a snapshot is never
    mistaken. Ids do not change while a snapshot exists, so ``table`` may be any
    the caller read since (None: read it now)."""
    if table is None:
        table = await list_snapshots("", path)
    ids = [s.id for s in table if s.tag == tag]
    if not ids:
        raise NotFound(f"disk {path} has no snapshot {tag!r}")
    if len(ids) > 1:
        raise StateError(f"disk {path} has {len(ids)} snapshots named {tag!r} "
                         f"(ids {', '.join(ids)}): delete the extra ones by id")
    return ids[0]


async def snapshot_create(path: Path, tag: str) -> None:
    await run_tool(["qemu-img", "snapshot", "-c", tag, "--", str(path)],
                   f"creating snapshot {tag!r} on {path}")


async def snapshot_delete(path: Path, tag: str, table: list[DiskSnapshot] | None = None) -> None:
    # ``snapshot -d`` (QEMU 7.2) looks the snapshot up by name only.
    await _snapshot_id(path, tag, table)
    await run_tool(["qemu-img", "snapshot", "-d", tag, "--", str(path)],
                   f"deleting snapshot {tag!r} on {path}")


async def snapshot_apply(path: Path, tag: str, table: list[DiskSnapshot] | None = None) -> None:
    ident = await _snapshot_id(path, tag, table)
    await run_tool(["qemu-img", "snapshot", "-a", ident, "--", str(path)],
                   f"reverting {path} to snapshot {tag!r}")
