"""The journal: what a multi-step operation is doing, written before each step.

One file per domain, ``<state dir>/journal/<domain>.json`` (operations on a
domain are serialized, so one is enough). A snapfs process killed mid-operation
leaves its journal behind; the next process that takes the domain's lock finds
it and finishes or rolls back the operation (``recovery.recover``). The step
names are the enums of ``operation.py``.

Steps are written without fsync: the journal must survive the death of a snapfs
process, whose writes the kernel keeps; a host crash takes the VM down anyway.
That keeps journal writes out of the guest's pause.

For tests, ``SNAPFS_DIE_AT=<operation>:<step>`` makes the process SIGKILL itself
right after recording that step, before taking it.
"""

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from .config import Dirs
from .files import make_dirs

__all__ = ["Journal", "Entry"]

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    operation: str
    facts: dict[str, Any]
    steps: list[str] = field(default_factory=list)

    @property
    def last(self) -> str:
        return self.steps[-1] if self.steps else ""

    def reached(self, step: str) -> bool:
        return step in self.steps


class Journal:
    """The journal of one domain."""

    def __init__(self, dirs: Dirs, domain: str) -> None:
        self.path = dirs.journals / f"{domain}.json"
        self.entry: Entry | None = None

    def _write(self, durable: bool) -> None:
        assert self.entry is not None
        data = json.dumps(self.entry.__dict__).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def begin(self, operation: str, **facts: Any) -> None:
        make_dirs(self.path.parent, 0o700)
        self.entry = Entry(operation, facts)
        self._write(durable=True)

    def step(self, step: str) -> None:
        """Record that ``step`` is about to be taken (nothing when replaying in recovery)."""
        if self.entry is None:
            return
        self.entry.steps.append(step)
        self._write(durable=False)
        if os.environ.get("SNAPFS_DIE_AT") == f"{self.entry.operation}:{step}":
            logger.warning("SNAPFS_DIE_AT=%s: dying here", os.environ["SNAPFS_DIE_AT"])
            os.kill(os.getpid(), signal.SIGKILL)

    def end(self) -> None:
        self.entry = None
        self.path.unlink(missing_ok=True)

    def read(self) -> Entry | None:
        """The entry a dead process left, if any (a malformed one is logged and dropped)."""
        try:
            raw = json.loads(self.path.read_text())
            return Entry(str(raw["operation"]), dict(raw["facts"]), list(raw["steps"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.error("journal %s is unreadable (%s); ignoring it", self.path, err)
            self.path.unlink(missing_ok=True)
            return None

    def pending(self) -> bool:
        return self.path.exists()
