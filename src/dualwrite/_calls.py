from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Awaitable
from typing import TypeVar

from dualwrite.errors import BackendError, BackendTimeout, DualWriteError

T = TypeVar("T")


TICK_S = 0.01
"""Coarse bounds end on the first tick at or after their deadline: at most this much late."""


class _Deadlines:
    """The deadlines of one event loop's bounded calls, by tick: one loop timer per tick
    however many calls end in it. Every send makes two bounded calls, and a timer of its own
    for each (a heap push, a cancel, and the heap's clean-up) cost more than the rest of the
    bound; the calls end before their deadline almost always."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticks: dict[int, set[asyncio.Timeout]] = {}

    def add(self, timeout: asyncio.Timeout, deadline: float) -> set[asyncio.Timeout]:
        """Expire ``timeout`` at the first tick at or after ``deadline``; returns the set to
        take it out of once its call is done."""
        tick = math.ceil(deadline / TICK_S)
        members = self._ticks.get(tick)
        if members is None:
            members = self._ticks[tick] = set()
            self._loop.call_at(tick * TICK_S, self._expire, tick)
        members.add(timeout)
        return members

    def _expire(self, tick: int) -> None:
        for timeout in self._ticks.pop(tick, ()):
            # Its call is still out (a finished one left the set): expire the bound now, as
            # `asyncio.timeout` would have at its deadline.
            with contextlib.suppress(RuntimeError):
                timeout.reschedule(self._loop.time())


_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


async def bounded(call: Awaitable[T], timeout_s: float, what: str, *, coarse: bool = False) -> T:
    """Await a backend call, turning "no answer within ``timeout_s``" into `BackendTimeout`.

    ``coarse``: the bound ends on the first tick at or after its deadline, at most `TICK_S`
    late, on a loop timer shared with the other calls ending in that tick (`_Deadlines`): for
    the calls every send makes, thousands a second, which almost never time out.
    """
    try:
        if not coarse or not math.isfinite(timeout_s):
            async with asyncio.timeout(timeout_s):
                return await call
        loop = asyncio.get_running_loop()
        deadlines = _DEADLINES.get(loop)
        if deadlines is None:
            deadlines = _DEADLINES[loop] = _Deadlines(loop)
        timeout = asyncio.timeout(None)
        async with timeout:
            members = deadlines.add(timeout, loop.time() + timeout_s)
            try:
                return await call
            finally:
                members.discard(timeout)
    except TimeoutError as exc:
        raise BackendTimeout(f"{what} did not answer within {timeout_s:g}s") from exc


async def guarded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """`bounded`, with any failure of the backend raised as `BackendError`: a 503 over HTTP
    and a one-line error from the CLI, never a 500 or a traceback."""
    try:
        return await bounded(call, timeout_s, what)
    except DualWriteError:
        raise
    except Exception as error:
        raise BackendError(f"{what} failed: {error!r}") from error
