"""The read rule (dualwrite.history): a page costs the same on any channel, each message once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dualwrite import InvalidInput, User
from dualwrite.model import (
    REALTIME_TTL_MS,
    ChannelRef,
    PermanentWrite,
    RealtimeMessage,
    history_cursor,
)
from tests.conftest import Harness, unique


@pytest.fixture
def channel() -> ChannelRef:
    return ChannelRef(unique("ws"), unique("ch"))


def message(message_id: str, sent_at: int) -> RealtimeMessage:
    return RealtimeMessage(message_id, "u1", "Ada", message_id, sent_at, sent_at + REALTIME_TTL_MS)


async def delivered(harness: Harness, channel: ChannelRef, count: int) -> list[RealtimeMessage]:
    """Messages in the realtime tier only (their sends still on the way, or queued)."""
    written = []
    for i in range(count):
        now = harness.clock.now_ms()
        message = RealtimeMessage(
            f"-{now:09d}{i:010d}"[:20], "u1", "Ada", f"m{i}", now, now + REALTIME_TTL_MS
        )
        await harness.realtime.inner.write(channel, message)
        written.append(message)
        harness.clock.advance(1)
    return written


async def test_the_newest_unsaved_messages_of_a_long_channel_are_on_the_first_page(
    harness: Harness, channel: ChannelRef
) -> None:
    # More unsaved entries than the old merge's 10,000-entry window: it read the oldest ones.
    written = await delivered(harness, channel, 10_050)
    page = await harness.dw.history(channel.workspace_id, channel.channel_id, limit=5)
    assert [m.message_id for m in page.messages] == [m.message_id for m in written[::-1][:5]]
    assert not any(m.saved for m in page.messages) and page.next_before is not None


async def test_a_page_reads_each_tier_once_and_looks_up_the_rest_in_one_call(
    harness: Harness, channel: ChannelRef
) -> None:
    for i in range(30):
        await harness.dw.send_message(channel.workspace_id, channel.channel_id, f"s{i}", ADA)
        harness.clock.advance(1)
    await delivered(harness, channel, 30)
    harness.realtime_faults.calls.clear()
    harness.store_faults.calls.clear()
    before = None
    seen: list[str] = []
    for _ in range(7):  # 60 messages, 10 a page, and a last empty look
        page = await harness.dw.history(channel.workspace_id, channel.channel_id, before, 10)
        seen += [m.message_id for m in page.messages]
        before = page.next_before
        if before is None:
            break
    assert len(seen) == len(set(seen)) == 60
    pages = harness.store_faults.calls["history"]
    assert harness.realtime_faults.calls["read_before"] == pages
    assert harness.store_faults.calls["get_many"] <= pages
    assert harness.store_faults.calls["get"] == 0
    assert harness.realtime_faults.calls["read_since"] == 0


async def test_the_cursor_is_opaque_and_forgeries_are_refused(
    harness: Harness, channel: ChannelRef
) -> None:
    for i in range(3):
        await harness.dw.send_message(channel.workspace_id, channel.channel_id, f"s{i}", ADA)
    page = await harness.dw.history(channel.workspace_id, channel.channel_id, limit=2)
    assert page.next_before is not None and ":" not in page.next_before
    last = page.messages[-1]
    assert page.next_before == history_cursor(last.timestamp, last.message_id)
    for forged in ("123:-abc", "x" * 500, "YzE6MTIzOg", "YzI6MTIzOi1h", "\u00e9\u00e9\u00e9\u00e9"):
        with pytest.raises(InvalidInput):
            await harness.dw.history(channel.workspace_id, channel.channel_id, forged)


ADA = User("u1", "Ada")


async def test_a_sender_clock_ahead_of_the_store_hides_no_unsaved_message(
    harness: Harness,
) -> None:
    """Saved entries whose sender clock ran 3 s ahead sort above their stored copies; an
    unsaved entry between the two must still be on some page, once."""
    channel = ChannelRef(unique("ws"), unique("ch"))
    now = harness.clock.now_ms()
    expected = []
    for i in range(10):
        skewed = message(f"-skew{i:02d}", now + 3_000 + i)
        await harness.realtime.write(channel, skewed)
        stored = replace(PermanentWrite.of(channel, skewed), sent_at=now + i).as_retry()
        await harness.store.save(stored)
        expected.append(skewed.message_id)
    unsaved = message("-unsaved", now + 20)
    await harness.realtime.write(channel, unsaved)
    expected.append(unsaved.message_id)
    seen: list[str] = []
    before = None
    for _ in range(10):
        page = await harness.dw.history(channel.workspace_id, channel.channel_id, before, 5)
        seen += [m.message_id for m in page.messages]
        if page.next_before is None:
            break
        before = page.next_before
    assert sorted(seen) == sorted(expected)
