"""`open_dualwrite`'s wiring: `--fault` (development only) decides once per send."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualwrite import SendFailed, Settings, User, open_dualwrite


async def test_realtime_faults_fail_that_share_of_sends_not_more(tmp_path: Path) -> None:
    settings = Settings(
        store_url="memory://", queue_path=str(tmp_path / "q.db"), fault_realtime=0.5
    )
    failed = 0
    async with open_dualwrite(settings, background=False) as dw:
        for i in range(400):
            try:
                # With a clientMessageId, as the page sends: its claim is not a second draw.
                await dw.send_message(
                    "ws", "general", f"m{i}", User("u1", "Ada"), client_message_id=f"c{i}"
                )
            except SendFailed:
                failed += 1
    # 400 draws at 0.5: 200 expected, standard deviation 10. Two draws a send fail 300.
    assert 150 <= failed <= 250


async def test_with_every_write_faulted_the_channel_can_still_be_read(tmp_path: Path) -> None:
    settings = Settings(
        store_url="memory://",
        queue_path=str(tmp_path / "q.db"),
        fault_realtime=1.0,
        fault_permanent=1.0,
    )
    async with open_dualwrite(settings, background=False) as dw:
        with pytest.raises(SendFailed):
            await dw.send_message("ws", "general", "hi", User("u1", "Ada"))
        page = await dw.history("ws", "general")
        assert page.messages == []
        assert await dw.channels("ws") == []


async def test_permanent_faults_make_each_send_pending_once(tmp_path: Path) -> None:
    settings = Settings(
        store_url="memory://", queue_path=str(tmp_path / "q.db"), fault_permanent=1.0
    )
    async with open_dualwrite(settings, background=False) as dw:
        result = await dw.send_message("ws", "general", "hi", User("u1", "Ada"))
        assert result.status == "pending"
        # The message is delivered and readable although its permanent write failed.
        page = await dw.history("ws", "general")
        assert [(m.text, m.saved) for m in page.messages] == [("hi", False)]
