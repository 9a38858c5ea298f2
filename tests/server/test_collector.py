"""`short_full_collections`: what survives a full collection is frozen (later full
collections skip it) and thawed on schedule or once it has grown by a quarter, and garbage
made meanwhile is still collected."""

from __future__ import annotations

import asyncio
import gc
import weakref

from dualwrite.server.collector import short_full_collections


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


async def test_survivors_of_a_full_collection_are_frozen_while_the_block_runs() -> None:
    async with short_full_collections(3600):
        gc.collect()
        assert gc.get_freeze_count() > 0
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


async def test_frozen_cycles_are_freed_once_the_frozen_objects_grow_by_a_quarter() -> None:
    async with short_full_collections(3600):
        gc.collect()  # the first full collection thaws once, as at a process's start
        await asyncio.sleep(1.5)
        survivor = _frozen_garbage_cycle()
        ballast: list[list[int]] = [[] for _ in range(gc.get_freeze_count() // 3)]
        gc.collect()
        await asyncio.sleep(1.5)
        assert survivor() is None, "not thawed after growing by a third"
        del ballast
