"""Hostile input: whatever is refused writes nothing; whatever is accepted reads back exactly."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualwrite import InvalidInput, User
from dualwrite.backends.permanent.memory import MemoryPermanentStore
from dualwrite.backends.permanent.sqlite import SqlitePermanentStore
from dualwrite.backends.realtime.memory import MemoryRealtimeTier
from dualwrite.clock import SystemClock
from dualwrite.model import ChannelRef
from dualwrite.ports import PermanentStore
from dualwrite.retry_queue import RetryQueue
from dualwrite.send import MessageSender, SendLimits
from dualwrite.settings import Settings

# Mostly nasty: control characters, the forbidden . $ # [ ] /, NUL, surrogates, emoji, RTL.
nasty = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.sampled_from(list(".$#[]/\x00\x01\x7f\u202e\u200f👋é__")),
    ),
    max_size=40,
)
ids = st.one_of(nasty, st.text(alphabet="abcXYZ019-_", min_size=1, max_size=30))
texts = st.one_of(nasty, st.text(min_size=1, max_size=200))


async def attempt(
    store: PermanentStore, queue_path: str, ws: str, ch: str, text: str, user: User
) -> None:
    clock = SystemClock()
    realtime = MemoryRealtimeTier(
        clock, Settings.memory_max_bytes, Settings.memory_max_claims, Settings.memory_max_buckets
    )
    queue = RetryQueue(queue_path)
    await queue.open()
    await store.connect()
    try:
        sender = MessageSender(realtime, store, queue, clock, SendLimits.from_settings(Settings()))
        try:
            result = await sender.send_message(ws, ch, text, user)
        except InvalidInput:
            # Nothing anywhere: no realtime channel, no permanent record, no queue entry.
            assert await realtime.channels() == []
            assert await queue.count() == 0
            if isinstance(store, MemoryPermanentStore):
                assert store._channels == {}
            return
        channel = ChannelRef(ws, ch)
        live = await realtime.read(channel, result.message_id)
        stored = await store.get(channel, result.message_id)
        assert live is not None and stored is not None
        assert (live.text, live.user_id, live.user_name) == (text, user.id, user.name)
        assert (stored.text, stored.user_id, stored.user_name) == (text, user.id, user.name)
        assert (stored.channel.workspace_id, stored.channel.channel_id) == (ws, ch)
    finally:
        await store.close()
        await queue.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ws=ids, ch=ids, text=texts, user_id=ids, user_name=nasty)
def test_refused_writes_nothing_and_accepted_round_trips(
    ws: str, ch: str, text: str, user_id: str, user_name: str
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = MemoryPermanentStore(SystemClock())
        asyncio.run(attempt(store, f"{scratch}/q.db", ws, ch, text, User(user_id, user_name)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(min_size=1, max_size=300), name=st.text(min_size=1, max_size=50))
def test_accepted_text_round_trips_through_sqlite_exactly(text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = SqlitePermanentStore(str(Path(scratch, "m.db")))
        asyncio.run(attempt(store, f"{scratch}/q.db", "ws", "general", text, User("u1", name)))
