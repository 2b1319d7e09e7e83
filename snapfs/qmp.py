"""The only module that touches qemu.qmp and asyncio.

qemu.qmp is an asyncio library; snapfs runs on trio. The bridge is one
dedicated asyncio event loop in a daemon thread: trio code submits coroutines
to it and sleeps on a trio event until they finish, so no trio worker thread
is held while QEMU works. (trio-asyncio would also do, but it needs its loop
opened around every trio entry point, CLI and FUSE alike; the thread keeps the
two libraries apart behind this one file. ``bench/bench_qmp.py`` measures the
round trip.)
"""

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from . import trace
from .errors import QemuError

__all__ = ["Monitor", "connect", "open_monitor"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _asyncio_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="snapfs-qmp", daemon=True).start()
            _loop = loop
        return _loop


async def _bridge(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` on the asyncio thread; wait for it without blocking trio."""
    async def wrapped() -> T:
        return await make()

    future = asyncio.run_coroutine_threadsafe(wrapped(), _asyncio_loop())
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


class Monitor:
    """One QMP connection to one QEMU; every QEMU failure becomes ``QemuError``."""

    def __init__(self, client: QMPClient, path: Path) -> None:
        self._client = client
        self.path = path
        self._listener: EventListener | None = None
        self._backlog: list[Any] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """:raise QemuError: when QEMU answers with an error or the connection fails."""
        trace.count(f"qmp {command}")
        try:
            return await _bridge(lambda: self._client.execute(command, arguments))
        except ExecuteError as err:
            raise QemuError(f"QEMU refused {command}: {err.error.error.desc}") from err
        except (QMPError, OSError, EOFError) as err:
            raise QemuError(f"QMP {command} on {self.path} failed: "
                            f"{err or type(err).__name__}") from err

    async def send_fd(self, fd: int, name: str) -> None:
        """Pass ``fd`` to QEMU over the socket and name it ``name`` (QMP ``getfd``)."""
        async def go() -> None:
            self._client.send_fd_scm(fd)
            await self._client.execute("getfd", {"fdname": name})
        try:
            await _bridge(go)
        except (QMPError, OSError) as err:
            raise QemuError(f"passing a file descriptor to QEMU failed: {err}") from err

    async def listen(self) -> None:
        """Start keeping events, so ``wait_event`` sees what happens from now on."""
        async def go() -> None:
            if self._listener is not None:
                self._client.remove_listener(self._listener)
            self._listener = EventListener()
            self._backlog = []
            self._client.register_listener(self._listener)
        await _bridge(go)

    async def wait_event(self, names: set[str]) -> dict[str, Any]:
        """The first event among ``names`` received since ``listen()`` and not yet
        waited for; events of other names are kept for later waits."""
        listener = self._listener
        assert listener is not None, "call listen() first"
        backlog = self._backlog

        async def get() -> dict[str, Any]:
            for index, event in enumerate(backlog):
                if event["event"] in names:
                    return dict(backlog.pop(index))
            while True:
                event = await listener.get()
                if event["event"] in names:
                    return dict(event)
                backlog.append(event)
        return await _bridge(get)

    async def aclose(self) -> None:
        """End the session; a QEMU that already exited is not an error."""
        with trio.CancelScope(shield=True):
            try:
                await _bridge(self._client.disconnect)
            except (QMPError, OSError, EOFError) as err:
                logger.debug("QMP disconnect from %s: %s", self.path, err)


async def open_monitor(path: Path) -> Monitor:
    """A QMP session on the socket at ``path``; close it with ``aclose``.

    QEMU serves one client per monitor at a time, so callers hold the domain
    lock and keep one session for a whole operation.

    :raise QemuError: when the socket is absent or QEMU does not answer.
    """
    trace.count("qmp connect")

    async def open_() -> QMPClient:
        c = QMPClient(path.name)
        await c.connect(str(path))
        return c

    try:
        client = await _bridge(open_)
    except (QMPError, OSError) as err:
        raise QemuError(f"cannot reach QEMU's monitor at {path}: {err}") from err
    return Monitor(client, path)


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Monitor]:
    """``open_monitor`` for the length of a block."""
    mon = await open_monitor(path)
    try:
        yield mon
    finally:
        await mon.aclose()
