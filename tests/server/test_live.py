"""Live fan-out: one subscription per channel; a slow listener is dropped, not waited for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dualwrite import Settings, User, open_dualwrite
from dualwrite.model import ChannelRef
from dualwrite.server import live
from dualwrite.server.live import LiveHub, Overflowed


async def test_a_slow_listener_overflows_while_a_fast_one_gets_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "SOCKET_BUFFER", 5)
    settings = Settings(store_url="memory://", queue_path=str(tmp_path / "q.db"))
    async with open_dualwrite(settings, background=False) as dw:
        hub = LiveHub(dw)
        channel = ChannelRef("ws", "general")
        received: list[str] = []
        async with hub.listen(channel, None) as fast, hub.listen(channel, None) as slow:
            await asyncio.sleep(0.05)

            async def consume() -> None:
                async for frame in fast:
                    received.append(frame)

            consumer = asyncio.create_task(consume())
            for i in range(20):
                await dw.send_message("ws", "general", f"m{i}", User("u1", "Ada"))
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            with pytest.raises(Overflowed):
                async for _ in slow:
                    pass
            consumer.cancel()
        assert len(received) == 20
        assert [f'"text":"m{i}"' in frame for i, frame in enumerate(received)] == [True] * 20


def test_fault_spec_parses_and_refuses_nonsense() -> None:
    from dualwrite.errors import BadSetting
    from dualwrite.settings import parse_fault_spec

    assert parse_fault_spec("realtime=0.5,permanent=1.0") == {
        "fault_realtime": 0.5,
        "fault_permanent": 1.0,
    }
    for bad in ("realtime", "disk=1", "permanent=x"):
        with pytest.raises(BadSetting):
            parse_fault_spec(bad)
    with pytest.raises(BadSetting):
        Settings.from_env({}, fault_permanent=2.0)


async def test_injected_permanent_faults_make_sends_pending(tmp_path: Path) -> None:
    settings = Settings(
        store_url="memory://", queue_path=str(tmp_path / "q.db"), fault_permanent=1.0
    )
    async with open_dualwrite(settings, background=False) as dw:
        result = await dw.send_message("ws", "general", "hi", User("u1", "Ada"))
    assert result.status == "pending"
