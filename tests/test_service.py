"""`DualWrite`'s live notices: a late save is announced, wherever it happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dualwrite import User
from dualwrite.model import ChannelRef, LiveEvent
from tests.conftest import Harness, unique
from tests.test_reconciler import delivered_only


async def listening(harness: Harness, workspace_id: str) -> AsyncIterator[LiveEvent]:
    events = harness.dw.events(workspace_id)
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.2)  # the subscription is open before anything is published

    async def rest() -> AsyncIterator[LiveEvent]:
        yield await asyncio.wait_for(first, 10)
        while True:
            yield await asyncio.wait_for(anext(events), 10)

    return rest()


async def test_a_retried_write_and_a_reconciled_one_are_announced(harness: Harness) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    events = await listening(harness, channel.workspace_id)
    harness.store_faults.fail()
    queued = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "late", User("u1", "Ada")
    )
    assert queued.status == "pending"
    harness.store_faults.heal()
    assert (await harness.dw.retry_all()).saved == [queued.message_id]
    assert await anext(events) == LiveEvent("saved", channel.channel_id, queued.message_id)

    orphan = await delivered_only(harness, channel, "orphan")
    harness.clock.advance(60_000)
    assert (await harness.dw.reconcile()).persisted == 1
    assert await anext(events) == LiveEvent("saved", channel.channel_id, orphan.message_id)


async def test_a_hung_realtime_tier_costs_the_retrier_one_timeout_not_one_per_write(
    harness: Harness,
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    harness.store_faults.fail()
    for i in range(5):
        await harness.dw.send_message(
            channel.workspace_id, channel.channel_id, f"m{i}", User("u1", "Ada")
        )
    harness.store_faults.heal()
    harness.realtime_faults.operations = frozenset({"publish"})
    harness.realtime_faults.hang()
    report = await harness.dw.retry_all()
    assert len(report.saved) == 5  # every write landed; the notices are best effort
    assert harness.realtime_faults.calls["publish"] == 1
    # A while later, notices are tried again.
    harness.realtime_faults.heal()
    harness.clock.advance(31_000)
    events = await listening(harness, channel.workspace_id)
    harness.store_faults.fail()
    late = await harness.dw.send_message(
        channel.workspace_id, channel.channel_id, "later", User("u1", "Ada")
    )
    harness.store_faults.heal()
    await harness.dw.retry_all()
    assert await anext(events) == LiveEvent("saved", channel.channel_id, late.message_id)
