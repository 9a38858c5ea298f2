"""The permanent-store contract: every backend in conftest.STORE_KINDS must pass it."""

from __future__ import annotations

import pytest

from dualwrite.clock import ManualClock
from dualwrite.errors import InvalidInput
from dualwrite.ids import PushIdGenerator
from dualwrite.model import ChannelRef, PermanentWrite
from dualwrite.ports import PermanentStore
from tests.conftest import needs_store, unique


@pytest.fixture
def channel() -> ChannelRef:
    return ChannelRef(unique("ws"), unique("ch"))


def make_write(
    channel: ChannelRef, message_id: str, sent_at: int, text: str = "hi"
) -> PermanentWrite:
    return PermanentWrite(channel, message_id, "u1", "Ada", text, sent_at)


async def test_save_then_get_returns_the_record_with_store_time(
    store: PermanentStore, channel: ChannelRef, clock: ManualClock
) -> None:
    write = make_write(channel, PushIdGenerator().new_id(), sent_at=123, text="héllo 👋\n\t\u202e")
    await store.save(write)
    stored = await store.get(channel, write.message_id)
    assert stored is not None
    wire = stored.to_wire()
    assert {k: v for k, v in wire.items() if k not in ("timestamp", "createdAt")} == {
        "messageId": write.message_id,
        "channelId": channel.channel_id,
        "workspaceId": channel.workspace_id,
        "userId": "u1",
        "userName": "Ada",
        "text": "héllo 👋\n\t\u202e",
    }
    # A first attempt takes the store's own time, not the sender's.
    assert stored.timestamp != 123
    assert stored.timestamp == stored.created_at
    assert await store.get(channel, "-missing") is None


async def test_find_looks_a_message_up_by_its_id_alone(
    store: PermanentStore, store_kind: str, channel: ChannelRef
) -> None:
    needs_store(store_kind, "find")
    ids = PushIdGenerator()
    other = ChannelRef(channel.workspace_id, unique("other"))
    wanted, elsewhere = make_write(channel, ids.new_id(), 1), make_write(other, ids.new_id(), 2)
    await store.save_many([wanted, elsewhere])
    found = await store.find(wanted.message_id)
    assert found == await store.get(channel, wanted.message_id)
    assert found is not None and found.channel == channel and found.text == "hi"
    found_elsewhere = await store.find(elsewhere.message_id)
    assert found_elsewhere is not None and found_elsewhere.channel == other
    assert await store.find(ids.new_id()) is None


async def test_saving_twice_keeps_one_record_and_its_first_time(
    store: PermanentStore, channel: ChannelRef
) -> None:
    write = make_write(channel, PushIdGenerator().new_id(), sent_at=5)
    await store.save(write)
    first = await store.get(channel, write.message_id)
    await store.save(write)
    await store.save(write.as_retry())
    assert await store.get(channel, write.message_id) == first
    page = await store.history(channel, None, 10)
    assert [m.message_id for m in page.messages] == [write.message_id]


async def test_a_retry_keeps_the_original_send_time(
    store: PermanentStore, channel: ChannelRef
) -> None:
    sent_at = 1_600_000_000_123
    write = make_write(channel, PushIdGenerator().new_id(), sent_at).as_retry()
    await store.save(write)
    stored = await store.get(channel, write.message_id)
    assert stored is not None
    assert stored.timestamp == sent_at
    assert stored.created_at > sent_at


async def test_history_pages_newest_first_with_a_cursor(
    store: PermanentStore, channel: ChannelRef
) -> None:
    ids = PushIdGenerator()
    writes = [make_write(channel, ids.new_id(), 1_600_000_000_000 + i, f"m{i}") for i in range(7)]
    for write in writes:
        await store.save(write.as_retry())
    # Same timestamp: ties are broken by id.
    tie = make_write(channel, ids.new_id(), writes[3].sent_at, "tie").as_retry()
    await store.save(tie)
    await store.save(make_write(ChannelRef(channel.workspace_id, unique("x")), ids.new_id(), 1))
    expected = [m.message_id for m in writes[:3]] + [writes[3].message_id, tie.message_id]
    expected += [m.message_id for m in writes[4:]]
    expected.reverse()

    seen: list[str] = []
    before: str | None = None
    while True:
        page = await store.history(channel, before, 3)
        seen += [m.message_id for m in page.messages]
        assert len(page.messages) <= 3
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == expected


async def test_history_of_an_empty_channel_is_empty(
    store: PermanentStore, channel: ChannelRef
) -> None:
    page = await store.history(channel, None, 10)
    assert page.messages == [] and page.next_before is None


async def test_a_forged_cursor_is_refused(store: PermanentStore, channel: ChannelRef) -> None:
    with pytest.raises(InvalidInput) as error:
        await store.history(channel, "not-a-cursor", 10)
    assert error.value.field == "before"


async def test_save_many_writes_each_once_keeping_existing_records(
    store: PermanentStore, channel: ChannelRef
) -> None:
    ids = PushIdGenerator()
    existing = make_write(channel, ids.new_id(), 1_600_000_000_000, "old").as_retry()
    await store.save(existing)
    batch = [existing] + [
        make_write(channel, ids.new_id(), 1_600_000_000_001 + i, f"b{i}").as_retry()
        for i in range(5)
    ]
    await store.save_many(batch)
    await store.save_many(batch)
    page = await store.history(channel, None, 100)
    assert [m.text for m in page.messages] == ["b4", "b3", "b2", "b1", "b0", "old"]
    assert [m.timestamp for m in page.messages][-1] == existing.sent_at


async def test_channels_lists_those_added_and_those_holding_messages(
    store: PermanentStore, store_kind: str, channel: ChannelRef
) -> None:
    needs_store(store_kind, "list_documents")
    workspace = channel.workspace_id
    assert await store.channels(workspace) == []
    await store.save(make_write(ChannelRef(workspace, "b-talk"), PushIdGenerator().new_id(), 1))
    await store.save(make_write(ChannelRef(workspace, "b-talk"), PushIdGenerator().new_id(), 2))
    await store.add_channel(ChannelRef(workspace, "a-new"))
    await store.add_channel(ChannelRef(workspace, "a-new"))  # idempotent
    await store.add_channel(ChannelRef(workspace, "b-talk"))  # added and holding messages
    await store.save(make_write(ChannelRef(workspace, "z-x"), PushIdGenerator().new_id(), 3))
    await store.add_channel(ChannelRef(unique("other"), "elsewhere"))
    assert await store.channels(workspace) == ["a-new", "b-talk", "z-x"]
    # An added channel holds no message.
    assert (await store.history(ChannelRef(workspace, "a-new"), None, 10)).messages == []


async def test_get_many_returns_the_saved_records_by_id(
    store: PermanentStore, channel: ChannelRef
) -> None:
    writes = [make_write(channel, f"-m{i}", sent_at=100 + i) for i in range(3)]
    await store.save_many(writes)
    other = ChannelRef(channel.workspace_id, "other")
    await store.save(make_write(other, "-x", sent_at=100))
    found = await store.get_many(channel, ["-m0", "-m2", "-missing", "-x"])
    assert sorted(found) == ["-m0", "-m2"]
    assert found["-m2"] == await store.get(channel, "-m2")
    assert await store.get_many(channel, []) == {}
