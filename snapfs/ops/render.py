"""The bytes of the tree's generated files, and the reader that serves them.

    <dom>/.status               render_status
    <dom>/.disk/<tag>/info      render_disk_info
    <dom>/<name>/info.json      render_info_json
    <dom>/<name>/disks/<dev>.changes  render_changes
    <dom>/<name>/snapshotdata.xl is ``store.format_info``, as the store writes it

A generated file is rendered once when it is opened (``BytesReader``), so
every read of one open file sees one version of it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import trio

from ..images import DiskSnapshot
from ..status import DomainStatus, Progress, printable
from ..store import VmSnapshot

__all__ = ["BytesReader", "render_changes", "render_disk_info", "render_info_json",
           "render_status"]


class BytesReader:
    """Generated content, rendered once at open so every read sees one version."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[offset:offset + size]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _clock(sec: int, nsec: int) -> str:
    return f"{sec // 3600:04d}:{sec // 60 % 60:02d}:{sec % 60:02d}.{nsec // 1_000_000:03d}"


def _local_time(sec: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))


def render_status(status: DomainStatus) -> str:
    """``.status``: one ``key: value`` line each, ``-`` for nothing; a crashed domain
    has a ``reason`` line. Control characters (from QEMU's log, from a name) are
    escaped: ``cat .status`` must not drive the terminal."""
    lines = [("domain", status.name), ("state", status.state)]
    if status.reason:
        lines.append(("reason", status.reason))
    lines += [("current", status.current),
              ("operation", _render_operation(status.operation)),
              ("last_error", status.last_error)]
    return "".join(f"{key}: {printable(value) or '-'}\n" for key, value in lines)


def _render_operation(op: Progress | None) -> str:
    if op is None:
        return ""
    text = op.operation + (f" ({op.phase})" if op.phase else "")
    if op.total:
        text += f" {100 * op.done // op.total}% ({op.done} of {op.total} bytes)"
    if op.started:
        text += f" since {_local_time(op.started)}"
    return text + (f" pid {op.pid}" if op.pid else "")


def render_info_json(snap: VmSnapshot, disk_snapshots: list[DiskSnapshot]) -> str:
    """``info.json``: the facts of ``vm-snapshot-list --json`` plus the disk snapshots."""
    facts = {**asdict(snap), "save": str(snap.save) if snap.save else None,
             "disk_tag": snap.disk_tag,
             "disk_snapshots": [asdict(s) for s in disk_snapshots if s.tag == snap.disk_tag]}
    return json.dumps(facts, indent=2) + "\n"


def render_disk_info(snaps: list[DiskSnapshot]) -> str:
    """``.disk/<tag>/info``: the columns of ``disk-snapshot-list``, one line per disk."""
    rows = [["DISK", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK"]]
    rows += [[s.dev, s.id, s.tag, str(s.vm_state_size), _local_time(s.date_sec),
              _clock(s.vm_clock_sec, s.vm_clock_nsec)] for s in snaps]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "".join(line + "\n" for line in lines)


def render_changes(parent: str | None, ranges: list[tuple[int, int]]) -> str:
    """``{"parent": ..., "ranges": [{"start": ..., "length": ...}, ...]}``, one range a line."""
    lines = ",\n".join(f'  {{"start": {start}, "length": {length}}}' for start, length in ranges)
    body = f"[\n{lines}\n]" if ranges else "[]"
    return f'{{"parent": {json.dumps(parent)},\n"ranges": {body}}}\n'
