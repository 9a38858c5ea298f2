"""What a live feed hands on: everything its readers queued, in one list."""

from __future__ import annotations

import asyncio

from dualwrite.model import LiveEntry


async def next_batches(out: asyncio.Queue[list[LiveEntry]]) -> list[LiveEntry]:
    """Wait for the first batch of ``out``, then take every batch already waiting too."""
    entries = list(await out.get())
    while not out.empty():
        entries += out.get_nowait()
    return entries
