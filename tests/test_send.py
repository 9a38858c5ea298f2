"""The story's testing list (docs/story.md), as a library user sees it, on every backend pair."""

from __future__ import annotations

import asyncio

import pytest

from dualwrite import NOT_SAVED_WARNING, SEND_FAILED_TEXT, InvalidInput, SendFailed, User
from dualwrite.backends import BackendContext, create_realtime_tier
from dualwrite.backends.permanent.memory import MemoryPermanentStore
from dualwrite.clock import ManualClock
from dualwrite.errors import BackendError, BackendTimeout, ClientMessageIdReused, NotQueued
from dualwrite.faults import Faults, FaultyPermanentStore, InjectedFault
from dualwrite.ids import PushIdGenerator
from dualwrite.model import ChannelRef, RealtimeMessage
from dualwrite.runtime import open_dualwrite
from dualwrite.settings import Settings
from tests.conftest import Harness, unique
from tests.support.wait import until

ADA = User("u1", "Ada")


@pytest.fixture
def channel() -> ChannelRef:
    return ChannelRef(unique("ws"), unique("ch"))


async def send(h: Harness, channel: ChannelRef, text: str = "hello", **kw: str) -> object:
    return await h.dw.send_message(channel.workspace_id, channel.channel_id, text, ADA, **kw)


async def test_message_lands_in_both_tiers_under_the_same_id(
    harness: Harness, channel: ChannelRef
) -> None:
    result = await harness.dw.send_message(channel.workspace_id, channel.channel_id, "hi", ADA)
    assert result.status == "saved" and result.warning is None
    assert str(result) == result.message_id and len(result.message_id) == 20
    live = await harness.realtime.read(channel, result.message_id)
    assert live is not None
    assert live.to_wire() == {
        "userId": "u1",
        "userName": "Ada",
        "text": "hi",
        "timestamp": harness.clock.now_ms(),
        "ttl": harness.clock.now_ms() + 3_600_000,
    }
    stored = await harness.store.get(channel, result.message_id)
    assert stored is not None
    assert stored.message_id == result.message_id and stored.text == "hi"
    assert await harness.dw.pending() == []


@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_realtime_failure_raises_and_writes_nothing_else(
    harness: Harness, channel: ChannelRef, fault: str
) -> None:
    harness.realtime_faults.fail() if fault == "fail" else harness.realtime_faults.hang()
    with pytest.raises(SendFailed) as error:
        await send(harness, channel)
    assert str(error.value) == SEND_FAILED_TEXT == "Message failed to send. Retry?"
    expected = InjectedFault if fault == "fail" else BackendTimeout
    assert isinstance(error.value.__cause__, expected)
    assert harness.store_faults.calls["save"] == 0
    harness.realtime_faults.heal()
    assert (await harness.dw.history(channel.workspace_id, channel.channel_id)).messages == []
    assert await harness.dw.pending() == []


@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_permanent_failure_delivers_warns_queues_then_retries_in_background(
    harness: Harness, channel: ChannelRef, fault: str
) -> None:
    harness.store_faults.fail() if fault == "fail" else harness.store_faults.hang()
    sent_at = harness.clock.now_ms()
    result = await send(harness, channel, "keep me")
    assert result.status == "pending"  # type: ignore[attr-defined]
    assert result.warning == NOT_SAVED_WARNING  # type: ignore[attr-defined]
    assert NOT_SAVED_WARNING == "Message sent but not saved. It will disappear in 1 hour."
    message_id = result.message_id  # type: ignore[attr-defined]
    assert await harness.realtime.read(channel, message_id) is not None
    [queued] = await harness.dw.pending()
    assert queued.message_id == message_id and queued.write.sent_at == sent_at

    # Still failing: the background round keeps it, later.
    report = await harness.dw.retrier.retry_due()
    assert report.failed == [message_id]
    assert await harness.dw.retrier.retry_due() == type(report)()  # not due yet (backoff)

    harness.store_faults.heal()
    harness.clock.advance(10 * 60 * 1000)
    assert (await harness.dw.retrier.retry_due()).saved == [message_id]
    assert await harness.dw.pending() == []
    stored = await harness.store.get(channel, message_id)
    assert stored is not None
    assert stored.timestamp == sent_at, "a retried write keeps the original send time"
    # Its "unconfirmed" mark is cleared as a send's save clears it: after an outage over many
    # channels the reconciler is not left one mark per message the retrier saved.
    await harness.dw.sender.confirmations.flush()
    assert await harness.realtime.unconfirmed(channel, None, harness.clock.now_ms(), 10) == []
    assert channel not in await harness.realtime.unconfirmed_channels(harness.clock.now_ms())


async def no_pending(h: Harness) -> bool:
    return not await h.dw.pending()


async def test_background_retrier_task_drains_the_queue(
    harness: Harness, channel: ChannelRef
) -> None:
    harness.store_faults.fail(times=1)
    result = await send(harness, channel)
    assert result.status == "pending"  # type: ignore[attr-defined]
    task = asyncio.create_task(harness.dw.retrier.run(poll_interval_s=0.01))
    try:
        await until(lambda: no_pending(harness), 5)
    finally:
        task.cancel()
    assert await harness.dw.pending() == []
    assert await harness.store.get(channel, result.message_id) is not None  # type: ignore[attr-defined]


async def test_manual_retry_of_one_message_and_of_all(
    harness: Harness, channel: ChannelRef
) -> None:
    harness.store_faults.fail()
    first = await send(harness, channel, "one")
    second = await send(harness, channel, "two")
    assert await harness.dw.retry(first.message_id) == "pending"  # type: ignore[attr-defined]
    harness.store_faults.heal()
    assert await harness.dw.retry(first.message_id) == "saved"  # type: ignore[attr-defined]
    # Saved already: a second retry has nothing to do; an id neither queued nor saved is refused.
    assert await harness.dw.retry(first.message_id) == "saved"  # type: ignore[attr-defined]
    with pytest.raises(NotQueued):
        await harness.dw.retry(PushIdGenerator().new_id())
    report = await harness.dw.retry_all()
    assert report.saved == [second.message_id]  # type: ignore[attr-defined]
    history = await harness.dw.history(channel.workspace_id, channel.channel_id)
    assert [m.text for m in history.messages] == ["two", "one"]
    assert all(m.saved for m in history.messages)


async def test_history_merges_unsaved_realtime_entries_once(
    harness: Harness, channel: ChannelRef
) -> None:
    # Both sends go through the queue so that both carry the test clock's time.
    harness.store_faults.fail()
    saved = await send(harness, channel, "saved")
    harness.clock.advance(5)
    await send(harness, channel, "unsaved")
    harness.store_faults.heal()
    assert await harness.dw.retry(saved.message_id) == "saved"  # type: ignore[attr-defined]
    history = await harness.dw.history(channel.workspace_id, channel.channel_id)
    assert [(m.text, m.saved) for m in history.messages] == [("unsaved", False), ("saved", True)]


async def test_history_pages_through_both_tiers_without_repeats(
    harness: Harness, channel: ChannelRef
) -> None:
    texts = []
    harness.store_faults.fail()
    for i in range(7):
        harness.clock.advance(10)
        result = await send(harness, channel, f"m{i}")
        texts.append(f"m{i}")
        if i % 2 == 0:
            harness.store_faults.heal()
            assert await harness.dw.retry(result.message_id) == "saved"  # type: ignore[attr-defined]
            harness.store_faults.fail()
    harness.store_faults.heal()
    seen: list[str] = []
    before = None
    while True:
        page = await harness.dw.history(channel.workspace_id, channel.channel_id, before, 3)
        seen += [m.text for m in page.messages]
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == list(reversed(texts))


async def test_ttl_expiry_removes_the_realtime_copy_only(
    harness: Harness, channel: ChannelRef
) -> None:
    result = await send(harness, channel)
    message_id = result.message_id  # type: ignore[attr-defined]
    harness.clock.advance(3_600_000)
    assert await harness.realtime.read(channel, message_id) is None
    await harness.dw.sweep()
    assert await harness.realtime.read_since(channel, None, 10) == []
    assert await harness.store.get(channel, message_id) is not None


async def test_same_client_message_id_never_makes_a_second_message(
    harness: Harness, channel: ChannelRef
) -> None:
    harness.store_faults.fail(times=1)
    first = await send(harness, channel, "once", client_message_id="c-1")
    assert first.status == "pending"  # type: ignore[attr-defined]
    harness.clock.advance(1000)
    again = await send(harness, channel, "once", client_message_id="c-1")
    assert again.message_id == first.message_id  # type: ignore[attr-defined]
    assert again.status == "saved"  # type: ignore[attr-defined]
    assert await harness.dw.pending() == []
    history = await harness.dw.history(channel.workspace_id, channel.channel_id)
    assert [m.message_id for m in history.messages] == [first.message_id]  # type: ignore[attr-defined]
    with pytest.raises(ClientMessageIdReused):
        await send(harness, channel, "other text", client_message_id="c-1")


async def test_a_retry_after_realtime_failure_reuses_the_id(
    harness: Harness, channel: ChannelRef
) -> None:
    harness.realtime_faults.operations = frozenset({"write"})
    harness.realtime_faults.fail(times=1)
    with pytest.raises(SendFailed):
        await send(harness, channel, "again", client_message_id="c-2")
    result = await send(harness, channel, "again", client_message_id="c-2")
    history = await harness.dw.history(channel.workspace_id, channel.channel_id)
    assert [m.message_id for m in history.messages] == [result.message_id]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("workspace", "channel_id", "text", "user", "field"),
    [
        ("", "c", "t", ADA, "workspaceId"),
        ("w.x", "c", "t", ADA, "workspaceId"),
        ("w", "a/b", "t", ADA, "channelId"),
        ("w", "c[1]", "t", ADA, "channelId"),
        ("w", "c\n", "t", ADA, "channelId"),
        ("w", "__id__", "t", ADA, "channelId"),
        ("w", "x" * 769, "t", ADA, "channelId"),
        ("w", "c", "", ADA, "text"),
        ("w", "c", "   \n", ADA, "text"),
        ("w", "c", "x" * 40_001, ADA, "text"),
        ("w", "c", "nul\x00", ADA, "text"),
        ("w", "c", "\ud800", ADA, "text"),
        ("w", "c", "t", User("", "Ada"), "user.id"),
        ("w", "c", "t", User("u#1", "Ada"), "user.id"),
        ("w", "c", "t", User("u1", ""), "user.name"),
    ],
)
async def test_bad_input_is_refused_by_field_and_writes_nothing(
    harness: Harness, workspace: str, channel_id: str, text: str, user: User, field: str
) -> None:
    with pytest.raises(InvalidInput) as error:
        await harness.dw.send_message(workspace, channel_id, text, user)
    assert error.value.field == field
    assert field in str(error.value)
    assert harness.realtime_faults.calls["write"] == 0
    assert harness.store_faults.calls["save"] == 0


async def test_the_text_limit_is_configurable(harness: Harness, channel: ChannelRef) -> None:
    await send(harness, channel, "x" * 40_000)
    with pytest.raises(InvalidInput):
        await send(harness, channel, "x" * 40_001)


async def test_a_repeat_minutes_later_keeps_the_first_send_time_in_the_store(
    tmp_path: object, clock: ManualClock
) -> None:
    # The memory store stamps with the (manual) clock, so "ten minutes later" needs no waiting.
    store = FaultyPermanentStore(MemoryPermanentStore(clock), Faults())
    settings = Settings(queue_path=f"{tmp_path}/queue.db")
    async with open_dualwrite(
        settings,
        realtime=create_realtime_tier("memory://", BackendContext(clock)),
        store=store,
        clock=clock,
        background=False,
    ) as dw:
        store.faults.fail(times=1)
        first = await dw.send_message("ws", "ch", "hello", ADA, client_message_id="c-late")
        assert first.status == "pending"
        clock.advance(600_000)
        again = await dw.send_message("ws", "ch", "hello", ADA, client_message_id="c-late")
        assert again.status == "saved" and again.timestamp == first.timestamp
        stored = await store.get(ChannelRef("ws", "ch"), first.message_id)
        assert stored is not None and stored.timestamp == first.timestamp


async def test_manual_persist_never_takes_a_message_back_when_the_queue_fails(
    harness: Harness, channel: ChannelRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Delivered by some process long ago; now the store fails and so does the local queue.
    now = harness.clock.now_ms()
    message = RealtimeMessage("-P7KWfirstdeliverd1", "u1", "Ada", "kept", now, now + 3_600_000)
    await harness.realtime.write(channel, message)
    harness.store_faults.fail()

    async def broken_put(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(harness.dw.sender._queue, "put", broken_put)
    with pytest.raises(BackendError):  # a 503 over HTTP
        await harness.dw.retry(message.message_id, channel.workspace_id, channel.channel_id)
    assert await harness.realtime.read(channel, message.message_id) == message


async def test_the_queue_listing_filters_by_workspace_before_its_limit(harness: Harness) -> None:
    harness.store_faults.fail()
    for i in range(3):
        await harness.dw.send_message("crowded", "general", f"m{i}", ADA)
    mine = await harness.dw.send_message("mine", "general", "me", ADA)
    listed = await harness.dw.pending(user_id=ADA.id, limit=2, workspace_id="mine")
    assert [e.message_id for e in listed] == [mine.message_id]
