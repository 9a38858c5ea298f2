"""Group commit keeps per-message semantics while sharing round trips."""

from __future__ import annotations

import asyncio

from dualwrite import User
from dualwrite.model import ChannelRef
from tests.conftest import Harness, unique


async def test_one_failing_message_in_a_batch_is_pending_while_the_others_are_saved(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    harness.store.poisoned = lambda write: write.text == "m3"

    async def send(i: int) -> tuple[str, str]:
        result = await harness.dw.send_message(
            channel.workspace_id, channel.channel_id, f"m{i}", User(f"u{i}", "U")
        )
        return result.message_id, result.status

    results = await asyncio.gather(*(send(i) for i in range(20)))

    assert harness.store_faults.calls["save_many"] >= 1, "concurrent writes shared a round trip"
    statuses = [status for _, status in results]
    assert statuses[3] == "pending"
    assert statuses[:3] + statuses[4:] == ["saved"] * 19
    [queued] = await harness.dw.pending()
    assert queued.write.text == "m3" and queued.message_id == results[3][0]
    history = await harness.dw.history(channel.workspace_id, channel.channel_id, limit=50)
    assert sorted(m.message_id for m in history.messages) == sorted(i for i, _ in results)
    assert [m.text for m in history.messages if not m.saved] == ["m3"]
    ids = [message_id for message_id, _ in results]
    assert ids == sorted(ids), "ids keep the order the sends were made in"
