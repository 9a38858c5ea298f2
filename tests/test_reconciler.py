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


async def send_saved(harness: Harness, channel: ChannelRef, count: int) -> None:
    for i in range(count):
        result = await harness.dw.send_message(
            channel.workspace_id, channel.channel_id, f"s{i}", User("u1", "Ada")
        )
        assert result.status == "saved"


async def test_a_round_costs_what_is_unsaved_not_what_the_tier_holds(harness: Harness) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    await send_saved(harness, channel, 200)
    orphan = await delivered_only(harness, channel, "orphan")
    harness.clock.advance(60_000)
    harness.store_faults.calls.clear()
    report = await harness.dw.reconcile()
    assert (report.scanned, report.persisted, report.failed) == (1, 1, 0)
    assert harness.store_faults.calls["get"] == 0
    assert harness.store_faults.calls["get_many"] == 1
    stored = await harness.store.get(channel, orphan.message_id)
    assert stored is not None and stored.timestamp == orphan.timestamp
    assert (await harness.dw.reconcile()).scanned == 0, "a saved message is no longer marked"


async def test_a_mark_left_by_a_failed_confirm_is_cleared_by_the_next_round(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    harness.realtime_faults.operations = frozenset({"confirm"})
    harness.realtime_faults.fail(times=1)
    await send_saved(harness, channel, 1)
    harness.clock.advance(60_000)
    report = await harness.dw.reconcile()
    assert (report.scanned, report.persisted, report.failed) == (1, 0, 0)
    assert (await harness.dw.reconcile()).scanned == 0


async def test_a_hung_store_ends_the_round_within_one_bound(harness: Harness) -> None:
    channels = [ChannelRef(unique("ws"), unique(name)) for name in ("a", "b", "c")]
    for channel in channels:
        await delivered_only(harness, channel, "orphan")
    harness.clock.advance(60_000)
    harness.store_faults.hang()
    harness.store_faults.calls.clear()
    report = await harness.dw.reconcile()  # returns: every call is bounded
    assert (report.failed, report.persisted) == (1, 0)
    assert harness.store_faults.calls["get_many"] == 1, "not one wait per channel"
    harness.store_faults.heal()
    report = await harness.dw.reconcile()
    assert report.persisted == 3 and report.failed == 0


async def test_one_failing_lookup_does_not_abort_the_round(harness: Harness) -> None:
    first, second = (ChannelRef(unique("ws"), unique(name)) for name in ("a", "b"))
    await delivered_only(harness, first, "one")
    await delivered_only(harness, second, "two")
    harness.clock.advance(60_000)
    harness.store_faults.operations = frozenset({"get", "get_many"})
    harness.store_faults.fail(times=1)
    report = await harness.dw.reconcile()
    assert report.persisted == 1 and report.failed == 1
    assert (await harness.dw.reconcile()).persisted == 1


async def test_a_round_visits_only_the_channels_holding_marks(harness: Harness) -> None:
    workspace = unique("ws")
    for i in range(30):
        await send_saved(harness, ChannelRef(workspace, f"quiet{i}"), 1)
    orphan = await delivered_only(harness, ChannelRef(workspace, "busy"), "orphan")
    harness.clock.advance(60_000)
    harness.realtime_faults.calls.clear()
    report = await harness.dw.reconcile()
    assert report.persisted == 1 and report.channels == 1
    assert harness.realtime_faults.calls["unconfirmed"] == 1, "not one call per channel"
    assert await harness.store.get(ChannelRef(workspace, "busy"), orphan.message_id) is not None
