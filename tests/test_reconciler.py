"""The gap the story leaves: delivered, then the process died before saving or queueing."""

from __future__ import annotations

import pytest

from dualwrite import User
from dualwrite.errors import BackendUnavailable
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, RealtimeMessage
from tests.conftest import Harness, unique


async def delivered_only(harness: Harness, channel: ChannelRef, text: str) -> RealtimeMessage:
    """What a process leaves behind if it dies right after the realtime write."""
    now = harness.clock.now_ms()
    message = RealtimeMessage(
        f"-{unique('id')}{text}"[:20], "u1", "Ada", text, now, now + REALTIME_TTL_MS
    )
    await harness.realtime.write(channel, message)
    return message


async def test_reconcile_saves_old_unsaved_messages_once_with_their_send_time(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    orphan = await delivered_only(harness, channel, "orphan")
    harness.clock.advance(10_000)
    young = await delivered_only(harness, channel, "young")
    harness.store_faults.fail()
    queued = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "queued", User("u2", "Bob")
    )
    harness.store_faults.heal()
    harness.clock.advance(25_000)  # orphan and queued are past the 30 s grace; young is not

    report = await harness.dw.reconcile()
    assert report.persisted == 1
    stored = await harness.store.get(channel, orphan.message_id)
    assert stored is not None and stored.timestamp == orphan.timestamp
    assert await harness.store.get(channel, young.message_id) is None
    assert await harness.store.get(channel, queued.message_id) is None, "the retrier owns it"
    assert (await harness.dw.reconcile()).persisted == 0, "idempotent"


async def test_inspect_shows_each_place_side_by_side(harness: Harness) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    harness.store_faults.fail()
    result = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "look", User("u1", "Ada")
    )
    harness.store_faults.heal()
    found = await harness.dw.inspect(result.message_id)  # channel found from the queue
    assert found.channel == channel
    assert found.realtime is not None and found.realtime.text == "look"
    assert found.permanent is None
    assert found.queued is not None and found.queued.message_id == result.message_id
    await harness.dw.retry(result.message_id)
    found = await harness.dw.inspect(result.message_id)  # found by scanning the channels
    assert found.channel == channel and found.permanent is not None and found.queued is None


async def test_inspect_by_id_alone_finds_a_saved_message_after_its_realtime_hour(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    result = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "old", User("u1", "Ada")
    )
    harness.clock.advance(3_600_001)
    await harness.dw.sweep()
    found = await harness.dw.inspect(result.message_id)  # found by the store, by id alone
    assert found.channel == channel and found.realtime is None
    assert found.permanent is not None and found.permanent.text == "old"
    assert await harness.dw.retry(result.message_id) == "saved", "saved already: nothing to do"


async def test_inspect_never_reports_absent_what_a_failing_store_could_not_look_up(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    result = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "kept", User("u1", "Ada")
    )
    harness.store_faults.fail()
    with pytest.raises(BackendUnavailable, match="inspect could not finish"):
        await harness.dw.inspect(result.message_id)
    with pytest.raises(BackendUnavailable, match="retry could not finish"):
        await harness.dw.retry(result.message_id)
