"""The read rule: a page of a channel from both tiers, each message once, newest first.

1. Read the page from the permanent store: ordered by (`timestamp`, `messageId`), strictly
   before the cursor. Those messages are saved.
2. Read, at the same time, the newest ``limit + 1`` realtime entries strictly before the
   cursor, from the tier's (timestamp, id) index. Keep those the store does not hold yet
   (delivered, not saved: queued, or a send still on its way), found with one batched lookup.
   Entries below a full stored page's oldest message belong to the next page, and so does
   whatever sorts below the oldest realtime entry read (with senders' clocks ahead of the
   store's, an unread unsaved entry could sort there): no entry falls behind the next cursor.
3. Sort, cut to the limit, and give the cursor of the last message shown when there is more.

Each tier is read for what can fall in the page and no more, so a page costs the same on any
channel. A message in both tiers is shown once, as saved. The merge is exact while the store's
clock and the senders' agree; a saved message whose two times differ is shown where the store
puts it.
"""

from __future__ import annotations

import asyncio

from dualwrite.model import (
    ChannelHistory,
    ChannelMessage,
    ChannelRef,
    history_cursor,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore, RealtimeTier

DEFAULT_PAGE_SIZE = 50
"""A page when the caller names no size (the HTTP API, the CLI, the library)."""


async def read_page(
    realtime: RealtimeTier,
    store: PermanentStore,
    channel: ChannelRef,
    before: str | None,
    limit: int,
) -> ChannelHistory:
    """One page of ``channel`` strictly before the ``before`` cursor (None: the newest)."""
    bound = parse_history_cursor(before) if before is not None else None
    try:
        async with asyncio.TaskGroup() as reads:  # both tiers at once
            stored = reads.create_task(store.history(channel, before, limit))
            recent = reads.create_task(realtime.read_before(channel, bound, limit + 1))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    page, batch = stored.result(), recent.result()
    merged = [ChannelMessage.from_stored(m) for m in page.messages]
    shown = {m.message_id for m in merged}
    floor = merged[-1].sort_key if page.next_before and merged else None
    candidates = [
        ChannelMessage.from_realtime(channel, entry)
        for entry in batch
        if entry.message_id not in shown
        and not (floor and (entry.timestamp, entry.message_id) < floor)
    ]
    if candidates:
        saved = await store.get_many(channel, [c.message_id for c in candidates])
        merged += [c for c in candidates if c.message_id not in saved]
    oldest_read = None
    if len(batch) > limit:
        # The tier holds older entries than this page read. Were the senders' clocks ahead of
        # the store's, saved entries sort above their stored copies and an unread, unsaved one
        # could sort among the stored messages: the page ends at the oldest entry read, and
        # the next page (its cursor at or above that entry) reads on from there.
        oldest_read = (batch[-1].timestamp, batch[-1].message_id)
        merged = [m for m in merged if m.sort_key >= oldest_read]
    merged.sort(key=lambda m: m.sort_key, reverse=True)
    more = page.next_before is not None or len(merged) > limit or oldest_read is not None
    merged = merged[:limit]
    end = merged[-1].sort_key if merged else oldest_read
    next_before = history_cursor(*end) if more and end else None
    return ChannelHistory(merged, next_before)
