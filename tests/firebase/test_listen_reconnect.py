"""A dropped event stream is reconnected, and what was written meanwhile still arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dualwrite.backends import BackendContext, create_realtime_tier
from dualwrite.clock import SystemClock
from dualwrite.ids import PushIdGenerator
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, RealtimeMessage
from tests.conftest import realtime_url, unique
from tests.firebase.servers import firebase_servers

pytestmark = pytest.mark.firebase


def message(ids: PushIdGenerator, text: str) -> RealtimeMessage:
    now = SystemClock().now_ms()
    return RealtimeMessage(ids.new_id(), "u1", "Ada", text, now, now + REALTIME_TTL_MS)


async def test_subscription_survives_a_dropped_stream(tmp_path: Path) -> None:
    servers = firebase_servers()
    if servers.rest_db is None:
        pytest.skip("needs the local firebase-rest server, which can drop its streams")
    tier = create_realtime_tier(realtime_url("firebase-rest", tmp_path), BackendContext())
    await tier.connect()
    channel, ids = ChannelRef(unique("ws"), "general"), PushIdGenerator()
    feed = tier.live_feed()
    try:
        await feed.watch(channel)
        before = message(ids, "before the drop")
        await tier.write(channel, before)
        assert [e.message for e in await asyncio.wait_for(feed.next_entries(), 10)] == [before]

        servers.rest_db.drop_streams()
        await asyncio.sleep(0.2)
        during = message(ids, "while disconnected")
        await tier.write(channel, during)
        # firebase-admin reconnects (after its 3 s retry delay); the reopened stream's snapshot
        # carries what was missed, and nothing already delivered comes twice.
        assert [e.message for e in await asyncio.wait_for(feed.next_entries(), 20)] == [during]
        after = message(ids, "after")
        await tier.write(channel, after)
        assert [e.message for e in await asyncio.wait_for(feed.next_entries(), 10)] == [after]
        await feed.close()
    finally:
        await tier.close()
