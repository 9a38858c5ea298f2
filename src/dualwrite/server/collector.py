"""The cyclic garbage collector of a `serve` process: full collections that stay short.

CPython's full (oldest-generation) collection walks every tracked object. A process holding
10,000 open sockets holds well over a million, almost all of them living as long as their
socket; a full collection there took 0.3 to 1.3 s, and came every few seconds to every
minute while messages flowed: every request and frame in flight waited it out (send and
delivery p99 of about 1.5 s at 200 sends/s, `dualwrite bench --target http --subscribers
10000`).

So after each full collection its survivors are frozen (`gc.freeze`: moved to a generation
the collector never walks), and the next full collection walks only what was made since.
Reference counting still frees frozen objects as usual; what freezing delays is only the
freeing of reference cycles among them (a closed socket's protocol and transport, say). Every
`thaw_every_s` they are unfrozen, so that the next full collection walks everything once,
frees those cycles, and its survivors are frozen again: one long collection an hour (by
default) instead of one a minute. This is Instagram's `gc.freeze` practice (Python docs,
`gc.freeze`), kept within one process's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    # Called by the collector once a collection is over: its lists are consistent again.
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


async def _thaw_every(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        gc.unfreeze()


@contextlib.asynccontextmanager
async def short_full_collections(thaw_every_s: float) -> AsyncIterator[None]:
    """Freeze the survivors of each full collection while the block runs, and unfreeze
    them every ``thaw_every_s`` (0: leave the collector as CPython sets it)."""
    if thaw_every_s <= 0:
        yield
        return
    gc.callbacks.append(_freeze_after_full_collection)
    thawing = asyncio.create_task(_thaw_every(thaw_every_s))
    try:
        yield
    finally:
        thawing.cancel()
        await asyncio.gather(thawing, return_exceptions=True)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(_freeze_after_full_collection)
        gc.unfreeze()
