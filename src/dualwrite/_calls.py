from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from dualwrite.errors import BackendError, BackendTimeout, DualWriteError

T = TypeVar("T")


async def bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await a backend call, turning "no answer within ``timeout_s``" into `BackendTimeout`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
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
