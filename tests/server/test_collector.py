"""`short_full_collections`: what survives a collection is frozen (later collections skip it)
and thawed on schedule or once the heap has grown by a quarter, and garbage made meanwhile is
still collected."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

import pytest
from prometheus_client import REGISTRY

from dualwrite.server.collector import (
    _GROWTH,
    _SMALLEST,
    _WIDE_MARGIN_S,
    _Freezer,
    _resident_bytes,
    short_full_collections,
)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _frozen_garbage_cycle() -> weakref.ref[_Node]:
    """A cycle that survives a full collection (frozen), then becomes garbage."""
    kept = [_Node()]
    kept[0].other = kept[0]
    survivor = weakref.ref(kept[0])
    gc.collect()  # survives, frozen
    kept.clear()
    gc.collect()
    assert survivor() is not None, "a frozen cycle waits for the thaw"
    return survivor


@pytest.mark.parametrize("generation", [0, 1, 2])
async def test_survivors_of_a_collection_are_frozen_while_the_block_runs(generation: int) -> None:
    async with short_full_collections(3600):
        kept: list[list[int]] = [[] for _ in range(1000)]
        gc.collect(generation)
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0, "left frozen after the block"


async def test_cycles_made_after_the_freeze_are_still_freed() -> None:
    async with short_full_collections(3600):
        gc.collect()
        made_after = _cycle()
        gc.collect()
        assert made_after() is None


async def test_cycles_frozen_are_freed_after_the_thaw() -> None:
    async with short_full_collections(0.3):
        frozen = _cycle()
        gc.collect()  # reachable from nothing: freed here already
        assert frozen() is None
        survivor = _frozen_garbage_cycle()
        await asyncio.sleep(0.5)
        gc.collect()
        assert survivor() is None


async def test_zero_leaves_the_collector_as_it_is() -> None:
    async with short_full_collections(0):
        gc.collect()
        assert gc.get_freeze_count() == 0


async def test_frozen_cycles_are_freed_once_the_heap_grows_by_a_quarter() -> None:
    async with short_full_collections(3600):
        survivor = _frozen_garbage_cycle()
        await asyncio.sleep(1.5)
        assert survivor() is not None, "thawed without growth"
        # A third more, and past the size below which growth does not count.
        grown = max(sys.getallocatedblocks() // 3, _SMALLEST)
        thaws_before = _thaws_counted()
        ballast: list[list[int]] = [[] for _ in range(grown)]
        await asyncio.sleep(1.5)
        assert survivor() is None, "not thawed after growing by a third"
        assert _thaws_counted() == thaws_before + 1, "the thaw is not in /metrics"
        del ballast


def _thaws_counted() -> float:
    return REGISTRY.get_sample_value("dualwrite_gc_thaw_seconds_count") or 0.0


async def test_a_thaw_that_found_the_growth_alive_waits_for_more_growth_next_time() -> None:
    async with short_full_collections(3600):
        freezer = _Freezer()
        kept: list[list[int]] = [[] for _ in range(200_000)]  # alive: sockets opening
        freezer.thaw()
        assert freezer.growth == 1.5
        freezer.after_thaw = sys.getallocatedblocks()
        nodes = [_Node() for _ in range(100_000)]
        for node in nodes:
            node.other = node
        gc.collect()  # frozen while alive...
        del nodes  # ...then garbage: closed sockets' cycles
        freezer.thaw()
        assert freezer.growth == 1.25
        del kept


class _Holder:
    def __init__(self, size: int) -> None:
        self.me = self
        self.buffer = bytearray(size)


async def test_frozen_cycles_holding_large_buffers_are_freed_once_rss_grows_by_a_quarter() -> None:
    # Buffers over 512 bytes are not allocated blocks: only RSS sees them grow.
    async with short_full_collections(3600):
        chunk = 1 << 20
        holders = [_Holder(chunk) for _ in range(max(64, _resident_bytes() // 2 // chunk))]
        first = weakref.ref(holders[0])
        gc.collect()  # frozen while alive: a socket's buffers
        holders.clear()  # then garbage: the socket closed
        await asyncio.sleep(2.5)
        assert first() is None, "not thawed after RSS grew by half"


def test_a_widened_margin_narrows_again_after_a_while() -> None:
    freezer = _Freezer()
    freezer.growth, freezer.widened_at = 3.0, 100.0
    freezer.thaw_due(now=100.0 + _WIDE_MARGIN_S / 2)
    assert freezer.growth == 3.0
    freezer.thaw_due(now=100.0 + _WIDE_MARGIN_S + 1)
    assert freezer.growth == _GROWTH
