"""The cyclic garbage collector of a `serve` process: collections that stay short.

CPython's collector walks, at each collection, every tracked object of the generations it
collects. A process holding 10,000 open sockets holds well over a million objects, almost all
living as long as their socket; and a socket's slow churn (a keepalive timer re-armed every 20
s, a parser waiting for the next pong) moves thousands of objects a second into the older
generations, only to die there. So the middle generation took 20-60 ms to walk, several times
a minute, the oldest 0.1-1.3 s, and every request and frame in flight waited it out (send and
delivery p99 of 100 ms to 1.5 s at 200 sends/s, `dualwrite bench --target http --subscribers
10000`).

So whatever survives a collection, of any generation, is frozen (`gc.freeze`: moved to a
generation the collector never walks): each collection walks only what was made since the last
one, a few thousand objects, in a millisecond or two. Reference counting still frees frozen
objects as usual (most die so: a request, a frame, a timer); what freezing delays is the freeing
of reference cycles among them, such as a closed socket's protocol and transport (about 6 KB a
socket), or an exception and its traceback. So the frozen objects are thawed, and walked once
by a full collection that frees those cycles, when the heap has grown by a quarter since the
last thaw (CPython's own rule for spacing full collections, counted in allocated blocks, and
in RSS for what blocks do not count: large buffers; twice that margin, up to threefold, for five
minutes after thaws that found the growth alive), and at the latest every `thaw_every_s`. A
process whose sockets come and go thus holds at most about a quarter more than it needs once
its thaws find garbage (threefold for at most five minutes after a burst of sockets opening),
and pays one long collection per such growth. This is
Instagram's `gc.freeze` practice (Python docs, `gc.freeze`), kept up over a process's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from dualwrite.metrics import GC_THAW_SECONDS

_GROWTH = 1.25
"""The heap may grow to this multiple of what the last thaw left before the next thaw..."""
_MOST_GROWTH = 3.0
"""...or, after thaws that found the growth alive (sockets opening), up to this multiple."""
_SMALLEST = 100_000
"""Below this many allocated blocks, growth does not count (a process still importing)."""
_CHECK_S = 1.0
"""How often the growth is read (`sys.getallocatedblocks` and `/proc/self/statm`: a fraction
of a millisecond)."""
_WIDE_MARGIN_S = 300.0
"""How long a margin widened by a thaw that found the growth alive lasts: a burst of sockets
opening ends within it, and garbage frozen meanwhile waits no longer than this for its thaw."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int:
    """The process's RSS (0 where `/proc` does not say). Allocated blocks count only objects of
    up to 512 bytes: a cycle holding a large buffer (a transport's, a bytearray) grows RSS
    without them."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class _Freezer:
    def __init__(self) -> None:
        self.after_thaw = sys.getallocatedblocks()
        self.rss_after_thaw = _resident_bytes()
        self.growth = _GROWTH
        self.widened_at = 0.0

    def collected(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector once a collection is over: its lists are consistent again.
        # Freezing moves them whole (no walk); counting the frozen objects would walk them.
        if phase == "stop":
            gc.freeze()

    def thaw_due(self, now: float = 0.0) -> bool:
        if self.growth > _GROWTH and now - self.widened_at > _WIDE_MARGIN_S:
            self.growth = _GROWTH
        if sys.getallocatedblocks() > max(_SMALLEST, self.after_thaw * self.growth):
            return True
        return _resident_bytes() > self.rss_after_thaw * self.growth

    def thaw(self, now: float = 0.0) -> None:
        """Unfreeze and collect everything once; the survivors are frozen again."""
        before, grown_from = sys.getallocatedblocks(), self.after_thaw
        with GC_THAW_SECONDS.time():
            gc.unfreeze()
            gc.collect()
        self.after_thaw = sys.getallocatedblocks()
        # RSS rarely shrinks after a collection (the allocator keeps its arenas): the margin
        # counts from where it stands now.
        self.rss_after_thaw = _resident_bytes()
        # A thaw that freed under a quarter of the growth found it alive (sockets opening, not
        # closed ones' cycles): the next waits for twice the margin, so that 10,000 sockets
        # opening pay 4 full collections, not 10, and none lands soon after; one that freed
        # more waits for the usual quarter again, as does one _WIDE_MARGIN_S later.
        if before - self.after_thaw < (before - grown_from) / 4:
            self.growth = min(_MOST_GROWTH, 1 + 2 * (self.growth - 1))
            self.widened_at = now
        else:
            self.growth = _GROWTH

    async def run(self, thaw_every_s: float) -> None:
        loop = asyncio.get_running_loop()
        next_thaw = loop.time() + thaw_every_s
        while True:
            # The thaw's collection runs here, on the loop, not inside another collection.
            await asyncio.sleep(min(_CHECK_S, max(0.0, next_thaw - loop.time())))
            now = loop.time()
            if now >= next_thaw or self.thaw_due(now):
                self.thaw(now)
                next_thaw = loop.time() + thaw_every_s


@contextlib.asynccontextmanager
async def short_full_collections(thaw_every_s: float) -> AsyncIterator[None]:
    """Freeze the survivors of each collection while the block runs; thaw them when the heap
    has grown by a quarter, and every ``thaw_every_s`` (0: leave the collector as CPython
    sets it)."""
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
