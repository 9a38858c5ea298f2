"""The cyclic garbage collector of a `serve` process: full collections that stay short.

CPython's full (oldest-generation) collection walks every tracked object. A process holding
10,000 open sockets holds well over a million, almost all of them living as long as their
socket; a full collection there took 0.3 to 1.3 s, and came every few seconds to every
minute while messages flowed (CPython counts the objects promoted to the oldest generation,
not those still alive, so short-lived caches and buffers keep triggering it): every request
and frame in flight waited it out (send and delivery p99 of about 1.5 s at 200 sends/s,
`dualwrite bench --target http --subscribers 10000`).

So after each full collection its survivors are frozen (`gc.freeze`: moved to a generation
the collector never walks), and the next full collection walks only what was made since.
Reference counting still frees frozen objects as usual; what freezing delays is the freeing
of reference cycles among them, such as a closed socket's protocol and transport (about 6 KB a
socket). So the frozen objects are thawed, and walked once by a full collection that frees
those cycles, when they have grown by a quarter since the last such collection (the rule
CPython itself uses to space full collections, but counted in objects still alive), and at
the latest every `thaw_every_s`. A process whose sockets come and go thus holds at most about
a quarter more than it needs, and pays one long collection per quarter of growth, not one a
minute. This is Instagram's `gc.freeze` practice (Python docs, `gc.freeze`), kept up over a
process's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

_GROWTH = 1.25
"""Frozen objects may grow to this multiple of what the last thaw left before the next thaw."""
_SMALLEST = 100_000
"""Below this many frozen objects, growth does not count (a process just started)."""


class _Freezer:
    def __init__(self) -> None:
        self.after_thaw = 0
        self.thaw_due = False

    def collected(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector once a collection is over: its lists are consistent again.
        if phase != "stop" or info.get("generation") != 2:
            return
        gc.freeze()
        frozen = gc.get_freeze_count()
        if frozen > max(_SMALLEST, self.after_thaw * _GROWTH):
            self.thaw_due = True

    def thaw(self) -> None:
        """Unfreeze and collect everything once; the survivors are frozen again."""
        gc.unfreeze()
        gc.collect()
        self.after_thaw = gc.get_freeze_count()
        self.thaw_due = False  # after: this very collection found the growth from before

    async def run(self, thaw_every_s: float) -> None:
        loop = asyncio.get_running_loop()
        next_thaw = loop.time() + thaw_every_s
        while True:
            # The growth is checked inside a collection; the thaw's own collection runs here,
            # on the loop, not inside another.
            await asyncio.sleep(min(1.0, max(0.0, next_thaw - loop.time())))
            if self.thaw_due or loop.time() >= next_thaw:
                self.thaw()
                next_thaw = loop.time() + thaw_every_s


@contextlib.asynccontextmanager
async def short_full_collections(thaw_every_s: float) -> AsyncIterator[None]:
    """Freeze the survivors of each full collection while the block runs; thaw them when
    they have grown by a quarter, and every ``thaw_every_s`` (0: leave the collector as
    CPython sets it)."""
    if thaw_every_s <= 0:
        yield
        return
    freezer = _Freezer()
    gc.callbacks.append(freezer.collected)
    thawing = asyncio.create_task(freezer.run(thaw_every_s))
    try:
        yield
    finally:
        thawing.cancel()
        await asyncio.gather(thawing, return_exceptions=True)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(freezer.collected)
        gc.unfreeze()
