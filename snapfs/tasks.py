"""Work side by side, failing as one: trio nurseries without exception groups.

A nursery raises its children's failures as an ``ExceptionGroup``; users and
the CLI must see the error that caused it ("no space left…"), not a group of
it and the cancellations it set off.
"""

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["side_by_side", "cause"]

T = TypeVar("T")


def cause(error: BaseException) -> BaseException:
    """The first error in ``error`` (a group, maybe nested) that is not a cancellation
    it set off; ``error`` itself when it is no group or holds only cancellations."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves = [cause(e) for e in error.exceptions]
    real = [e for e in leaves if not isinstance(e, trio.Cancelled | BaseExceptionGroup)]
    return real[0] if real else error


async def side_by_side(main: Callable[[], Awaitable[T]],
                       *beside: Callable[[], Awaitable[None]]) -> T:
    """Run ``main`` with ``beside`` alongside; return ``main``'s result once all are
    done. The first failure cancels the rest and is raised as itself."""
    result: list[T] = []

    async def run_main() -> None:
        result.append(await main())

    try:
        async with trio.open_nursery() as nursery:
            for task in beside:
                nursery.start_soon(task)
            await run_main()
    except BaseExceptionGroup as group:
        first = cause(group)
        if first is group:
            raise
        raise first from None
    return result[0]
