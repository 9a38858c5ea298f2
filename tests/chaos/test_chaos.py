"""The chaos scenario with a modest N (`dualwrite chaos --messages N` runs it by hand)."""

from __future__ import annotations

import os

import pytest

from dualwrite.tools.chaos import run_chaos

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def test_nothing_acknowledged_is_lost_or_duplicated_under_real_faults() -> None:
    url = os.environ.get("DUALWRITE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DUALWRITE_TEST_POSTGRES_URL is not set")
    lines: list[str] = []
    report = await run_chaos(url, messages=150, concurrency=6, spacing_s=1.2, progress=lines.append)
    print(report.summary())
    assert report.faults == [
        "redis paused",
        "redis killed",
        "redis restarted",
        "postgresql connections terminated",
        "postgresql cut off",
        "serve a killed (SIGKILL)",
        "serve a restarted",
        "postgresql restored; pending messages repeated well after their first attempt",
        "postgresql black-holed",
        "postgresql answers again",
    ]
    assert report.queued_at_kill > 0, "the SIGKILL hit a server holding queued writes"
    assert report.late_repeats > 0, "some pending messages were repeated over 5 s later"
    assert report.acknowledged > 0
    assert report.acknowledged + report.failed == report.sent
    assert report.lost == 0
    assert report.duplicated == 0
    assert report.misdated == 0
    assert report.left_in_queues == 0
