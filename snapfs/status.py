"""What a domain is doing: its run state, the operation in progress, its last error.

Plain facts shared by the engine that records them and by the CLI and the tree
that show them.
"""

import enum
from dataclasses import dataclass

__all__ = ["RunState", "Progress", "DomainStatus", "printable"]


class RunState(enum.StrEnum):
    """A domain's state as ``domain status`` and ``.status`` name it."""

    RUNNING = "running"
    PAUSED = "paused"       # QEMU alive, vCPUs stopped (paused, postmigrate, inmigrate...)
    SHUTOFF = "shutoff"     # no QEMU
    CRASHED = "crashed"     # QEMU stopped the guest on an error, or died without a stop


@dataclass(frozen=True)
class Progress:
    operation: str
    phase: str = ""             # what the operation is doing now, e.g. "saving memory"
    done: int = 0               # bytes
    total: int = 0
    pid: int = 0
    started: float = 0.0


@dataclass(frozen=True)
class DomainStatus:
    name: str
    state: str                  # a RunState's value
    current: str
    operation: Progress | None
    last_error: str
    reason: str = ""            # why it is crashed, in QEMU's words where it gave any


def printable(text: str) -> str:
    """Text from files and from QEMU as a terminal may show it: control characters
    (an escape sequence in an info file or a log, say) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
