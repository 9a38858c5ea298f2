"""`serve --fault`: injected faults, as a person uses them to see both banners."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualwrite import Settings, User, open_dualwrite


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
