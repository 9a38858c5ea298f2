from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from dualwrite.errors import BackendTimeout

T = TypeVar("T")


async def bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await a backend call, turning "no answer within ``timeout_s``" into `BackendTimeout`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except TimeoutError as exc:
        raise BackendTimeout(f"{what} did not answer within {timeout_s:g}s") from exc
