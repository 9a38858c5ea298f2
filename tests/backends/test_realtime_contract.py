"""The realtime-tier contract: every backend in conftest.REALTIME_KINDS must pass it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from dualwrite.clock import ManualClock
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.ids import PushIdGenerator
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, LiveEntry, LiveEvent, RealtimeMessage
from dualwrite.ports import LiveFeed, RealtimeTier, SendClaim, SendKey, TokenRequest
from tests.conftest import needs, unique


def make_message(clock: ManualClock, ids: PushIdGenerator, text: str = "hi") -> RealtimeMessage:
    now = clock.now_ms()
    return RealtimeMessage(ids.new_id(), "u1", "Ada", text, now, now + REALTIME_TTL_MS)


@pytest.fixture
def channel() -> ChannelRef:
    return ChannelRef(unique("ws"), unique("ch"))


@pytest.fixture
def ids(clock: ManualClock) -> PushIdGenerator:
    return PushIdGenerator(clock.now_ms)


async def test_write_then_read_returns_the_exact_record(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    message = make_message(clock, ids, "héllo 👋 \u202eRTL\n\ttab")
    await realtime.write(channel, message)
    assert await realtime.read(channel, message.message_id) == message
    assert await realtime.read(channel, "-missing") is None
    assert message.to_wire() == {
        "userId": "u1",
        "userName": "Ada",
        "text": "héllo 👋 \u202eRTL\n\ttab",
        "timestamp": message.timestamp,
        "ttl": message.timestamp + 3_600_000,
    }


async def test_read_since_lists_in_id_order_after_the_given_id(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    messages = [make_message(clock, ids, f"m{i}") for i in range(5)]
    for message in reversed(messages):
        await realtime.write(channel, message)
    assert await realtime.read_since(channel, None, 100) == messages
    assert await realtime.read_since(channel, messages[1].message_id, 100) == messages[2:]
    assert await realtime.read_since(channel, None, 2) == messages[:2]
    other = ChannelRef(channel.workspace_id, unique("other"))
    assert await realtime.read_since(other, None, 100) == []


async def test_rewriting_an_id_keeps_one_entry(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    message = make_message(clock, ids)
    await realtime.write(channel, message)
    await realtime.write(channel, message)
    assert await realtime.read_since(channel, None, 100) == [message]


async def test_delete_removes_the_entry(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    kept, gone = make_message(clock, ids), make_message(clock, ids)
    await realtime.write(channel, kept)
    await realtime.write(channel, gone)
    await realtime.delete(channel, gone.message_id)
    assert await realtime.read(channel, gone.message_id) is None
    assert await realtime.read_since(channel, None, 100) == [kept]


async def test_expired_entries_are_never_read_and_are_swept(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    old = make_message(clock, ids, "old")
    await realtime.write(channel, old)
    clock.advance(REALTIME_TTL_MS - 1000)
    young = make_message(clock, ids, "young")
    await realtime.write(channel, young)
    assert await realtime.read(channel, old.message_id) == old
    clock.advance(1000)  # exactly at old.ttl: expired
    assert await realtime.read(channel, old.message_id) is None
    assert await realtime.read_since(channel, None, 100) == [young]
    await realtime.sweep_expired(clock.now_ms())
    assert await realtime.read_since(channel, None, 100) == [young]
    clock.advance(REALTIME_TTL_MS)
    await realtime.sweep_expired(clock.now_ms())
    assert await realtime.read_since(channel, None, 100) == []


async def test_read_after_pages_through_writes_in_write_order(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    messages = [make_message(clock, ids, f"m{i}") for i in range(7)]
    # Written out of id order, and the first one rewritten last (a repeated send).
    order = [messages[3], *messages[:3], *messages[4:], messages[3]]
    for message in order:
        await realtime.write(channel, message)
    got, cursor = [], None
    while True:
        page = await realtime.read_after(channel, cursor, 3)
        got += page.entries
        cursor = page.next_cursor
        if page.caught_up:
            break
    if realtime_kind_orders_by_write(realtime):
        assert [e.message for e in got] == order
        assert len({e.cursor for e in got}) == len(order)
    else:  # Firebase: id order, each id once (module docstring of its backend)
        assert [e.message for e in got] == messages
    assert all(e.channel == channel for e in got)
    # After the cursor of an entry: what followed it.
    later = await realtime.read_after(channel, got[2].cursor, 100)
    assert [e.message for e in later.entries][-1] == got[-1].message
    assert got[2].message not in [e.message for e in later.entries[:1]]
    empty = await realtime.read_after(ChannelRef(channel.workspace_id, unique("c")), None, 10)
    assert empty.entries == [] and empty.caught_up


def realtime_kind_orders_by_write(realtime: RealtimeTier) -> bool:
    return "firebase" not in type(realtime).__module__


async def test_read_after_a_cursor_older_than_kept_is_expired(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    await realtime.write(channel, make_message(clock, ids, "old"))
    await realtime.write(channel, make_message(clock, ids, "lost"))
    old = (await realtime.read_after(channel, None, 10)).entries[0].cursor
    clock.advance(REALTIME_TTL_MS + 1000)
    await realtime.write(channel, make_message(clock, ids, "new"))
    with pytest.raises(CursorExpired):
        await realtime.read_after(channel, old, 10)
    for bad in ("nonsense", "1.2.3", "-", "x" * 200, "99999999999999999999-1", "1-" + "9" * 20):
        with pytest.raises((InvalidInput, CursorExpired)):
            await realtime.read_after(channel, bad, 10)


async def test_cursor_at_a_time_reads_the_writes_from_then(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    await realtime.write(channel, make_message(clock, ids, "first"))
    cursor = await realtime.cursor_at(channel, clock.now_ms() - 60_000)
    page = await realtime.read_after(channel, cursor, 10)
    assert [e.message.text for e in page.entries] == ["first"]


async def test_one_feed_delivers_every_watched_channel(
    realtime: RealtimeTier,
    realtime_kind: str,
    clock: ManualClock,
    ids: PushIdGenerator,
) -> None:
    needs(realtime_kind, "listen")
    workspace = unique("ws")
    count = 3 if realtime_kind.startswith("firebase") else 150
    channels = [ChannelRef(workspace, f"c{i}") for i in range(count)]
    feed = realtime.live_feed()
    try:
        for channel in channels:
            await feed.watch(channel)
        # Watched means in place: a write right after `watch` returns is delivered.
        written = {}
        for channel in channels:
            message = make_message(clock, ids, channel.channel_id)
            await realtime.write(channel, message)
            written[channel] = message
        got = await _collect(feed, count)
        assert {e.channel: e.message for e in got} == written
        replayed = await realtime.read_after(channels[0], None, 10)
        assert [e.cursor for e in replayed.entries] == [
            e.cursor for e in got if e.channel == channels[0]
        ]
        # A rewrite is a write: it comes again. An unwatched channel is quiet.
        feed.unwatch(channels[1])
        await realtime.write(channels[1], make_message(clock, ids, "unwatched"))
        await realtime.write(channels[0], written[channels[0]])
        again = await _collect(feed, 1)
        assert [(e.channel, e.message) for e in again] == [(channels[0], written[channels[0]])]
    finally:
        await feed.close()


async def _collect(feed: LiveFeed, count: int) -> list[LiveEntry]:
    got: list[LiveEntry] = []
    while len(got) < count:
        got += await asyncio.wait_for(feed.next_entries(), 10)
    return got


async def test_claim_send_binds_a_key_once(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock
) -> None:
    needs(realtime_kind, "transaction")
    key = SendKey(unique("ws"), "u1", "client-1")
    first = SendClaim("-first", 1, "f1")
    assert await realtime.claim_send(key, first, REALTIME_TTL_MS) == first
    assert await realtime.claim_send(key, SendClaim("-second", 2, "f2"), REALTIME_TTL_MS) == first
    other_user = SendKey(key.workspace_id, "u2", "client-1")
    second = SendClaim("-other", 3, "f3")
    assert await realtime.claim_send(other_user, second, REALTIME_TTL_MS) == second


async def test_channels_lists_the_channels_with_entries(
    realtime: RealtimeTier, clock: ManualClock, ids: PushIdGenerator
) -> None:
    workspace = unique("ws")
    first, second = ChannelRef(workspace, "alpha"), ChannelRef(workspace, "beta")
    await realtime.write(first, make_message(clock, ids))
    await realtime.write(second, make_message(clock, ids))
    listed = [c for c in await realtime.channels() if c.workspace_id == workspace]
    assert listed == [first, second]


async def test_an_expired_claim_no_longer_binds_its_key(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock
) -> None:
    needs(realtime_kind, "transaction")
    if realtime_kind.startswith("redis"):
        pytest.skip("Redis expires keys by its own clock (PX), which the test clock cannot move")
    key = SendKey(unique("ws"), "u1", "client-1")
    first = SendClaim("-first", 1, "f1")
    assert await realtime.claim_send(key, first, 1000) == first
    clock.advance(1001)
    await realtime.sweep_expired(clock.now_ms())
    second = SendClaim("-second", 2, "f2")
    assert await realtime.claim_send(key, second, 1000) == second


def take(key: str, cost: float, rate_per_s: float, burst: float) -> list[TokenRequest]:
    return [TokenRequest(key, cost, rate_per_s, burst)]


async def test_take_tokens_allows_a_burst_then_says_how_long_to_wait(
    realtime: RealtimeTier, realtime_kind: str
) -> None:
    needs(realtime_kind, "transaction")
    key, other = unique("limit"), unique("limit")
    # One token an hour: nothing refills while the test runs, whatever clock the tier uses.
    rate = 1 / 3600
    assert await realtime.take_tokens(take(key, 1, rate, 2)) == 0.0
    assert await realtime.take_tokens(take(key, 1, rate, 2)) == 0.0
    wait = await realtime.take_tokens(take(key, 1, rate, 2))
    assert 3000 < wait <= 3600
    assert await realtime.take_tokens(take(other, 2, rate, 2)) == 0.0, "buckets are per key"
    assert await realtime.take_tokens(take(other, 1, rate, 2)) > 0


async def test_take_tokens_refuses_what_does_not_fit_without_taking_it(
    realtime: RealtimeTier, realtime_kind: str
) -> None:
    needs(realtime_kind, "transaction")
    key = unique("limit")
    rate = 1 / 3600
    assert await realtime.take_tokens(take(key, 8, rate, 10)) == 0.0
    assert await realtime.take_tokens(take(key, 5, rate, 10)) > 0, "2 left, 5 asked"
    assert await realtime.take_tokens(take(key, 2, rate, 10)) == 0.0, "the refused 5 took nothing"


async def test_take_tokens_charges_several_buckets_in_one_call(
    realtime: RealtimeTier, realtime_kind: str
) -> None:
    needs(realtime_kind, "transaction")
    user, channel = unique("user"), unique("channel.with.dots/and/slashes")
    rate = 1 / 3600
    # The refusing bucket first: Firebase charges those before it (see the Protocol).
    both = [TokenRequest(channel, 3, rate, 4), TokenRequest(user, 1, rate, 2)]
    assert await realtime.take_tokens(both) == 0.0
    assert await realtime.take_tokens(both) > 0, "the channel has 1 left, 3 asked"
    assert await realtime.take_tokens(take(user, 1, rate, 2)) == 0.0, "the user still had 1"
    assert await realtime.take_tokens([]) == 0.0


async def test_take_tokens_refills_with_time(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock
) -> None:
    needs(realtime_kind, "transaction")
    if realtime_kind.startswith("redis"):
        pytest.skip("Redis refills by its own clock (TIME), which the test clock cannot move")
    key = unique("limit")
    assert await realtime.take_tokens(take(key, 1, 1.0, 1)) == 0.0
    assert await realtime.take_tokens(take(key, 1, 1.0, 1)) == pytest.approx(1.0, abs=0.01)
    clock.advance(1000)
    assert await realtime.take_tokens(take(key, 1, 1.0, 1)) == 0.0


async def test_published_events_reach_every_listener_of_the_workspace_only(
    realtime: RealtimeTier, realtime_kind: str, channel: ChannelRef
) -> None:
    needs(realtime_kind, "listen")
    workspace = channel.workspace_id
    first, second = realtime.events(workspace), realtime.events(workspace)
    other = realtime.events(unique("other"))
    got_first = asyncio.ensure_future(anext(first))
    got_second = asyncio.ensure_future(anext(second))
    got_other = asyncio.ensure_future(anext(other))
    await asyncio.sleep(0.3)  # the listeners are open before anything is published
    saved = LiveEvent("saved", channel.channel_id, "-Nabc")
    await realtime.publish(workspace, saved)
    assert await asyncio.wait_for(got_first, 10) == saved
    assert await asyncio.wait_for(got_second, 10) == saved
    created = LiveEvent("channel", "brand-new")
    await realtime.publish(workspace, created)
    assert await asyncio.wait_for(anext(first), 10) == created
    assert not got_other.done()
    got_other.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await got_other
    for iterator in (first, second, other):
        await cast(AsyncGenerator[LiveEvent, None], iterator).aclose()


def at(timestamp: int, message_id: str, text: str = "t") -> RealtimeMessage:
    return RealtimeMessage(message_id, "u1", "Ada", text, timestamp, timestamp + REALTIME_TTL_MS)


async def test_read_before_pages_newest_first_in_time_then_id_order(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock
) -> None:
    now = clock.now_ms()
    # Three share a millisecond (ordered by id there); ids need not follow the times.
    messages = [
        at(now - 5, "-c"),
        at(now - 3, "-a"),
        at(now - 3, "-b"),
        at(now - 3, "-d"),
        at(now - 1, "-0"),
    ]
    for message in reversed(messages):
        await realtime.write(channel, message)
    newest_first = messages[::-1]
    assert await realtime.read_before(channel, None, 10) == newest_first
    assert await realtime.read_before(channel, None, 2) == newest_first[:2]
    assert await realtime.read_before(channel, (now - 3, "-d"), 2) == newest_first[2:4]
    assert await realtime.read_before(channel, (now - 3, "-b"), 10) == newest_first[3:]
    assert await realtime.read_before(channel, (now - 5, "-c"), 10) == []
    other = ChannelRef(channel.workspace_id, unique("other"))
    assert await realtime.read_before(other, None, 10) == []


async def test_read_before_skips_expired_and_deleted_entries(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    old = make_message(clock, ids, "old")
    await realtime.write(channel, old)
    clock.advance(REALTIME_TTL_MS - 1000)
    kept, gone = make_message(clock, ids, "kept"), make_message(clock, ids, "gone")
    await realtime.write(channel, kept)
    await realtime.write(channel, gone)
    await realtime.delete(channel, gone.message_id)
    clock.advance(1000)
    assert await realtime.read_before(channel, None, 10) == [kept]


async def test_unconfirmed_lists_what_no_save_confirmed_oldest_first(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    messages = []
    for i in range(5):
        messages.append(make_message(clock, ids, f"m{i}"))
        await realtime.write(channel, messages[-1])
        clock.advance(10)
    until = messages[3].timestamp
    assert await realtime.unconfirmed(channel, None, until, 10) == messages[:4]
    assert await realtime.unconfirmed(channel, None, until, 2) == messages[:2]
    after = (messages[1].timestamp, messages[1].message_id)
    assert await realtime.unconfirmed(channel, after, until, 10) == messages[2:4]
    await realtime.confirm(channel, [messages[0].message_id, messages[2].message_id])
    await realtime.delete(channel, messages[3].message_id)
    assert await realtime.unconfirmed(channel, None, clock.now_ms(), 10) == [
        messages[1],
        messages[4],
    ]
    await realtime.write(channel, messages[0])  # a rewrite marks it again
    assert (await realtime.unconfirmed(channel, None, clock.now_ms(), 10))[0] == messages[0]


async def test_unconfirmed_drops_the_marks_of_expired_entries(
    realtime: RealtimeTier, channel: ChannelRef, clock: ManualClock, ids: PushIdGenerator
) -> None:
    await realtime.write(channel, make_message(clock, ids, "old"))
    clock.advance(REALTIME_TTL_MS)
    young = make_message(clock, ids, "young")
    await realtime.write(channel, young)
    assert await realtime.unconfirmed(channel, None, clock.now_ms(), 10) == [young]


async def test_unconfirmed_channels_lists_the_channels_holding_old_marks(
    realtime: RealtimeTier, clock: ManualClock, ids: PushIdGenerator
) -> None:
    workspace = unique("ws")
    marked, confirmed = ChannelRef(workspace, "marked"), ChannelRef(workspace, "confirmed")
    old = make_message(clock, ids, "old")
    await realtime.write(marked, old)
    done = make_message(clock, ids, "done")
    await realtime.write(confirmed, done)
    await realtime.confirm(confirmed, [done.message_id])
    listed = [
        c
        for c in await realtime.unconfirmed_channels(clock.now_ms())
        if c.workspace_id == workspace
    ]
    assert listed == [marked]


async def test_unconfirmed_channels_sorts_hundreds_of_channels_at_once(
    realtime: RealtimeTier, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # More channels than one Redis pipeline covers: a reconcile round after a busy minute.
    workspace = unique("ws")
    channels = [ChannelRef(workspace, f"c{i}") for i in range(250)]
    messages = [make_message(clock, ids, c.channel_id) for c in channels]
    await asyncio.gather(*(realtime.write(c, m) for c, m in zip(channels, messages, strict=True)))
    await asyncio.gather(
        *(
            realtime.confirm(c, [m.message_id])
            for c, m in zip(channels[::2], messages[::2], strict=True)
        )
    )
    for _ in range(2):  # the second round finds the confirmed ones settled off the list
        listed = {
            c
            for c in await realtime.unconfirmed_channels(clock.now_ms())
            if c.workspace_id == workspace
        }
        assert listed == set(channels[1::2])


async def test_a_channel_is_listed_while_it_holds_marks_and_not_once_they_are_cleared(
    realtime: RealtimeTier, clock: ManualClock, ids: PushIdGenerator
) -> None:
    channel = ChannelRef(unique("ws"), "busy")

    async def listed() -> bool:
        return channel in await realtime.unconfirmed_channels(clock.now_ms())

    # Writes and saves racing on one channel, as concurrent sends make them: whatever the
    # interleaving, a channel holding a mark stays listed (else its gap would never close).
    messages = [make_message(clock, ids, f"m{i}") for i in range(60)]
    confirmed = [m.message_id for m in messages[::2]]
    await asyncio.gather(
        *(realtime.write(channel, m) for m in messages),
        *(realtime.confirm(channel, [message_id]) for message_id in confirmed),
    )
    await realtime.confirm(channel, confirmed)  # those that raced ahead of their write
    assert await listed()
    assert len(await realtime.unconfirmed(channel, None, clock.now_ms(), 100)) == 30
    await realtime.confirm(channel, [m.message_id for m in messages[1::2]])
    assert not await listed()
    repeat = messages[5]  # a repeated send rewrites the entry with its first send time
    clock.advance(60_000)
    await realtime.write(channel, repeat)
    assert channel in await realtime.unconfirmed_channels(repeat.timestamp)
    assert [m.message_id for m in await realtime.unconfirmed(channel, None, clock.now_ms(), 9)] == [
        repeat.message_id
    ]


async def test_a_malformed_entry_in_a_redis_stream_is_skipped_live_and_on_resume(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    if not realtime_kind.startswith("redis"):
        pytest.skip("writes a raw stream entry, as another program sharing Redis could")
    channel = ChannelRef(unique("ws"), "general")
    feed = realtime.live_feed()
    try:
        await feed.watch(channel)
        raw: Any = realtime._r  # type: ignore[attr-defined]
        await raw.xadd(realtime.stream_key(channel), {"id": "x", "data": "{not json"})  # type: ignore[attr-defined]
        good = make_message(clock, ids, "after the junk")
        await realtime.write(channel, good)
        assert [e.message for e in await _collect(feed, 1)] == [good]
        assert [e.message for e in (await realtime.read_after(channel, None, 10)).entries] == [good]
    finally:
        await feed.close()


def _redis_internals(realtime: RealtimeTier, realtime_kind: str) -> Any:
    if not realtime_kind.startswith("redis"):
        pytest.skip("drives the Redis tier's write steps one by one")
    return realtime


async def _listed_at(tier: Any, channel: ChannelRef) -> float | None:
    """The channel's score on the Redis list of channels holding marks (None: not listed)."""
    name = f"{channel.workspace_id}/{channel.channel_id}"
    return cast("float | None", await tier._r.zscore(tier._unconfirmed_channels, name))


async def test_a_confirm_racing_a_write_between_its_listings_leaves_its_channel_listed(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # The reviewer's race, step by step: write W lists its channel; another send on the
    # channel is saved and confirmed, which settles the channel in its batch (W's mark is not
    # made yet); then W's script makes its mark and W dies before its second listing.
    tier = _redis_internals(realtime, realtime_kind)
    channel = ChannelRef(unique("ws"), "busy")
    w, other = make_message(clock, ids, "W"), make_message(clock, ids, "other")
    await tier._in_order(lambda pipe: tier._register(pipe, [(channel, w)]))
    await realtime.write(channel, other)
    await realtime.confirm(channel, [other.message_id])
    await tier._settling  # the batch that settles the channels confirms left without marks
    await tier._write_script(**tier._script_call(channel, w))
    # (no second listing: W's process is gone)
    assert channel in await realtime.unconfirmed_channels(clock.now_ms())
    assert await realtime.unconfirmed(channel, None, clock.now_ms(), 10) == [w]
    await realtime.confirm(channel, [w.message_id])  # reconciled: saved, confirmed
    # W's write still counts in flight: its channel stays listed, but once taken for dead it
    # is put off for minutes, not visited every round, and forgotten after the TTL.
    assert await _listed_at(tier, channel) is not None
    clock.advance(120_000)
    assert await realtime.unconfirmed_channels(clock.now_ms()) is not None
    assert await _listed_at(tier, channel) == clock.now_ms() + 300_000
    clock.advance(REALTIME_TTL_MS)
    await realtime.unconfirmed_channels(clock.now_ms())
    assert await _listed_at(tier, channel) is None


async def test_a_channel_its_confirms_leave_without_marks_leaves_the_list_soon(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # Without a reconcile round: the list stays as short as the channels holding marks.
    tier = _redis_internals(realtime, realtime_kind)
    channels = [ChannelRef(unique("ws"), f"c{i}") for i in range(3)]
    messages = [make_message(clock, ids, f"m{i}") for i in range(3)]
    for channel, message in zip(channels, messages, strict=True):
        await realtime.write(channel, message)

    async def listed(channel: ChannelRef) -> bool:
        return await _listed_at(tier, channel) is not None

    assert all([await listed(c) for c in channels])
    for channel, message in zip(channels[:2], messages[:2], strict=True):
        await realtime.confirm(channel, [message.message_id])
    for _ in range(50):
        if not await listed(channels[0]) and not await listed(channels[1]):
            break
        await asyncio.sleep(0.1)
    assert [await listed(c) for c in channels] == [False, False, True]


async def test_settling_leaves_a_channel_listed_by_a_write_that_began_during_it(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # A write's first listing lands while a settle checks the channel's marks again (after
    # it read the generation): the settle must not remove the channel; the write's mark
    # then lands and the write dies before its second listing.
    tier = _redis_internals(realtime, realtime_kind)
    channel = ChannelRef(unique("ws"), "busy")
    w, other = make_message(clock, ids, "W"), make_message(clock, ids, "other")
    await realtime.write(channel, other)
    original = tier._oldest_marks
    calls = 0

    async def oldest_marks(channels: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the round's check made after reading the generation (its first
            # read of the marks found none: the confirm below cleared the only one)
            await tier._in_order(lambda pipe: tier._register(pipe, [(channel, w)]))
        return await original(channels)

    await realtime.confirm(channel, [other.message_id])
    tier._oldest_marks = oldest_marks
    try:
        assert channel not in await realtime.unconfirmed_channels(clock.now_ms())
    finally:
        del tier._oldest_marks
    assert calls == 2
    await tier._write_script(**tier._script_call(channel, w))
    assert channel in await realtime.unconfirmed_channels(clock.now_ms())
    assert await realtime.unconfirmed(channel, None, clock.now_ms(), 10) == [w]


async def test_a_write_refused_by_redis_ends_its_time_in_flight(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # Scripts answered with an error (as NOSCRIPT after a failover) surely did not run: the
    # listing after them still runs, so the channel does not stay counted in flight.
    tier = _redis_internals(realtime, realtime_kind)
    channel = ChannelRef(unique("ws"), "refused")
    message = make_message(clock, ids, "refused")
    name = f"{channel.workspace_id}/{channel.channel_id}"

    def refused(pipe: Any) -> None:
        key = tier.stream_key(channel)
        pipe.execute_command("EVAL", "return redis.error_reply('ERR refused')", 1, key)

    with pytest.raises(Exception, match="refused"):
        await tier._in_order(
            lambda pipe: tier._register(pipe, [(channel, message)]),
            refused,
            lambda pipe: tier._list_unconfirmed(pipe, [(channel, message)], before=False),
        )
    raw: Any = tier._r
    assert await raw.hget(tier._unconfirmed_writes, f"i:{name}") is None
    await realtime.unconfirmed_channels(clock.now_ms())  # no mark: settled, taken off
    assert await _listed_at(tier, channel) is None


async def test_a_write_after_redis_lost_its_script_loads_it_again(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # A restart or SCRIPT FLUSH: a lone write (one round trip, EVALSHA) meets NOSCRIPT.
    tier = _redis_internals(realtime, realtime_kind)
    channel = ChannelRef(unique("ws"), "flushed")
    name = f"{channel.workspace_id}/{channel.channel_id}"
    await tier._r.script_flush()
    message = make_message(clock, ids, "after the flush")
    await realtime.write(channel, message)
    assert await realtime.read(channel, message.message_id) == message
    # Its listings ran twice (the lone try, then the reloading one): none is left in flight.
    assert int(await tier._r.hget(tier._unconfirmed_writes, f"i:{name}") or 0) == 0
    assert await realtime.unconfirmed(channel, None, clock.now_ms(), 10) == [message]


async def test_writes_retried_after_a_batch_failed_are_not_written_twice(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # A pipeline is not a transaction: a batch answered with an error (a SCRIPT FLUSH landing
    # mid-pipeline, one primary failing over) has run its other scripts. Injected: every
    # script of the batch runs, then the batch fails.
    from redis.exceptions import NoScriptError

    tier = _redis_internals(realtime, realtime_kind)
    write_many = tier._write_many
    failed_batches = 0

    async def runs_then_fails(items: Any, once: bool = False) -> None:
        nonlocal failed_batches
        await write_many(items, once)
        if len(items) > 1:
            failed_batches += 1
            raise NoScriptError("NOSCRIPT (injected after the batch ran)")

    channel = ChannelRef(unique("ws"), "half-failed")
    messages = [make_message(clock, ids, f"m{i}") for i in range(30)]
    tier._write_many = runs_then_fails
    tier._writes, tier._writes_to = tier._write_batches(), {}
    try:
        await asyncio.gather(*(realtime.write(channel, m) for m in messages))
    finally:
        del tier._write_many
        tier._writes, tier._writes_to = tier._write_batches(), {}
    assert failed_batches >= 1
    assert await tier._r.xlen(tier._key(channel, "stream")) == len(messages), "written twice"
    page = await realtime.read_before(channel, None, 50)
    assert sorted(m.message_id for m in page) == sorted(m.message_id for m in messages)


async def test_a_script_lost_again_between_its_reload_and_its_run_still_runs(
    realtime: RealtimeTier, realtime_kind: str, clock: ManualClock, ids: PushIdGenerator
) -> None:
    # SCRIPT FLUSHes close together: each reload is flushed before the script runs again.
    tier = _redis_internals(realtime, realtime_kind)
    client = tier._write_script.registered_client
    load = client.script_load

    async def load_then_lose(script: Any) -> Any:
        sha = await load(script)
        await client.script_flush()
        return sha

    channel = ChannelRef(unique("ws"), "flushed-again")
    message = make_message(clock, ids, "after two flushes")
    await client.script_flush()
    client.script_load = load_then_lose
    try:
        await realtime.write(channel, message)
        page = await realtime.read_before(channel, None, 10)
    finally:
        del client.script_load
    assert page == [message]
    assert await realtime.read(channel, message.message_id) == message
