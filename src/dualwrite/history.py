"""The read rule: a page of a channel from both tiers, each message once, newest first.

1. Read the page from the permanent store: ordered by (`timestamp`, `messageId`), strictly
   before the cursor. Those messages are saved.
2. Add the realtime entries that can fall in that page and that the store does not hold yet
   (delivered, not saved: queued, or a send still on its way). Entries below a full stored
   page's oldest message belong to the next page; entries at or past the cursor to the last.
3. Sort, cut to the limit, and give the cursor of the last message shown when there is more.

A message in both tiers is shown once, as saved. The realtime scan starts a minute below the
page's floor: ids begin with their send time, and a minute covers clock skew between tiers.
"""

from __future__ import annotations

from dualwrite.ids import time_prefix
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

_REALTIME_SCAN_LIMIT = 10_000
_CLOCK_SKEW_MS = 60_000


async def read_page(
    realtime: RealtimeTier,
    store: PermanentStore,
    channel: ChannelRef,
    before: str | None,
    limit: int,
) -> ChannelHistory:
    """One page of ``channel`` strictly before the ``before`` cursor (None: the newest)."""
    bound = parse_history_cursor(before) if before is not None else None
    page = await store.history(channel, before, limit)
    merged = [ChannelMessage.from_stored(m) for m in page.messages]
    shown = {m.message_id for m in merged}
    floor = merged[-1].sort_key if page.next_before and merged else None
    scan_from = time_prefix(max(0, floor[0] - _CLOCK_SKEW_MS)) if floor else None
    for entry in await realtime.read_since(channel, scan_from, _REALTIME_SCAN_LIMIT):
        candidate = ChannelMessage.from_realtime(channel, entry)
        if candidate.message_id in shown:
            continue
        if (bound and candidate.sort_key >= bound) or (floor and candidate.sort_key < floor):
            continue
        if await store.get(channel, candidate.message_id) is None:
            merged.append(candidate)
    merged.sort(key=lambda m: m.sort_key, reverse=True)
    more = page.next_before is not None or len(merged) > limit
    merged = merged[:limit]
    next_before = history_cursor(*merged[-1].sort_key) if more and merged else None
    return ChannelHistory(merged, next_before)
