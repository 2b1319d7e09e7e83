"""Where an operation's time goes: named phases and counted calls.

An operation opens a ``Trace`` (``operation.py`` does, for every verb); code
below it marks its phases with ``phase("stop")`` and counts the calls that
cost (``count("qmp connect")``, ``count("qemu-img info")``) without being
handed the trace: it travels in a context variable, which trio copies into
child tasks and worker threads. When the operation ends the trace is

- logged at DEBUG (``snapfs -v``): the phases with their milliseconds;
- appended as one JSON line to ``$SNAPFS_TRACE`` when that names a file, which
  is how ``bench/run`` breaks an operation down and how tests count QMP
  sessions and ``qemu-img`` runs, with nothing patched.

A phase nested in another is recorded with its depth (per task: phases run
side by side are not nested); a phase or count with
no trace open costs a context-variable lookup.
"""

import contextvars
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Trace", "Phase", "phase", "count", "tracing", "TRACE_ENV"]

logger = logging.getLogger(__name__)

TRACE_ENV = "SNAPFS_TRACE"


@dataclass(frozen=True)
class Phase:
    name: str
    depth: int
    start: float        # seconds since the operation began
    seconds: float


@dataclass
class Trace:
    """The phases and counts of one operation on one domain."""

    operation: str
    domain: str
    began: float = field(default_factory=time.monotonic)
    phases: list[Phase] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def to_json(self, seconds: float, error: str) -> str:
        return json.dumps({
            "operation": self.operation, "domain": self.domain, "seconds": round(seconds, 6),
            "error": error, "counts": dict(self.counts),
            "phases": [[p.name, p.depth, round(p.start, 6), round(p.seconds, 6)]
                       for p in self.in_order()],
        })

    def in_order(self) -> list[Phase]:
        """The phases in the order they began (each is recorded when it ends)."""
        return sorted(self.phases, key=lambda p: (p.start, p.depth))

    def summary(self) -> str:
        return ", ".join(f"{'  ' * p.depth}{p.name} {p.seconds * 1000:.1f} ms"
                         for p in self.in_order())


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "snapfs_trace", default=None)
# How deep in phases the running task is: each trio task has its own copy, so a
# phase run side by side with another is not counted inside it.
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("snapfs_trace_depth", default=0)


@contextmanager
def tracing(operation: str, domain: str) -> Iterator[Trace]:
    """Trace ``operation`` for as long as the block runs; report it at the end."""
    trace = Trace(operation, domain)
    token = _current.set(trace)
    error = ""
    try:
        yield trace
    except BaseException as err:
        error = type(err).__name__
        raise
    finally:
        _current.reset(token)
        seconds = time.monotonic() - trace.began
        logger.debug("%s of %s took %.1f ms: %s; %s", operation, domain, seconds * 1000,
                     trace.summary() or "no phases", dict(trace.counts))
        _append(trace.to_json(seconds, error))


def _append(line: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        logger.debug("cannot append to %s=%s: %s", TRACE_ENV, path, err)
        return
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` of the operation being traced, if any."""
    trace = _current.get()
    if trace is None:
        yield
        return
    start = time.monotonic()
    depth = _depth.get()
    token = _depth.set(depth + 1)
    try:
        yield
    finally:
        _depth.reset(token)
        trace.phases.append(Phase(name, depth, start - trace.began, time.monotonic() - start))


def count(what: str) -> None:
    """Count one ``what`` (a QMP session, a qemu-img run) in the operation traced."""
    trace = _current.get()
    if trace is not None:
        trace.counts[what] += 1
