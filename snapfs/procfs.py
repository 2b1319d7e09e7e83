"""What /proc says about a process: its state, parent, start time, command line, files.

The QEMU of a domain and the qemu-nbd of a disk view outlive the snapfs process
that started them, and pids are recycled: every check of "is that still our
process" reads these facts, here and only here.
"""

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEAD_STATES", "ProcInfo", "alive", "cmdline", "file_position", "pids", "proc_info"]

DEAD_STATES = ("Z", "X", "x")


@dataclass(frozen=True)
class ProcInfo:
    state: str
    ppid: int
    start: int  # clock ticks since boot; with the pid, identifies a process


def proc_info(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat``'s state, parent and start time; None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        # The command name may hold spaces and parentheses: split after the last ')'.
        rest = data[data.rindex(b")") + 2:].split()
        return ProcInfo(rest[0].decode(), int(rest[1]), int(rest[19]))
    except (ValueError, IndexError):
        return None


def alive(pid: int | None, start: int | None = None) -> bool:
    """True when process ``pid`` runs (not a zombie) and, if given, started at ``start``."""
    if not pid:
        return False
    info = proc_info(pid)
    if info is None or info.state in DEAD_STATES:
        return False
    return start is None or info.start == start


def cmdline(pid: int) -> list[str]:
    """The process's arguments; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def pids() -> list[int]:
    """Every process now running, by pid (unsorted); empty when /proc is unreadable."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def file_position(pid: int, path: Path) -> int:
    """How far process ``pid`` has read or written ``path`` (its fd's offset), 0 if unknown."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(info.split("pos:", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0
