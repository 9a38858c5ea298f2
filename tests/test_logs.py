"""The outage log: a backend down is a line, then reminders, then a line when it is back."""

from __future__ import annotations

import logging

import pytest

from dualwrite.logs import OutageLog, one_line


def test_an_outage_is_one_line_then_rate_limited_reminders(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    outage = OutageLog(logging.getLogger("t"), "reconcile round", 300, now=lambda: now[0])
    error = ConnectionError("connection refused\n\tIs the server running?")
    with caplog.at_level(logging.WARNING):
        for second in range(0, 900, 10):  # a round every 10 s for 15 minutes
            now[0] = float(second)
            outage.failed(error)
        now[0] = 905.0
        outage.succeeded()
        outage.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        "reconcile round failed: ConnectionError: connection refused",
        "reconcile round still failing after 300 s (30 more failures): "
        "ConnectionError: connection refused",
        "reconcile round still failing after 600 s (30 more failures): "
        "ConnectionError: connection refused",
        "reconcile round works again after 905 s",
    ]


def test_a_job_that_stops_failing_starts_a_new_outage_only_after_a_quiet_spell(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    outage = OutageLog(logging.getLogger("t"), "reconcile round", 300, now=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for second in (0, 60, 120, 500, 560):  # failing, then quiet for 380 s, then failing
            now[0] = float(second)
            outage.failed(OSError("down"))
    assert [r.getMessage() for r in caplog.records] == [
        "reconcile round failed: OSError: down",
        "reconcile round failed: OSError: down",
    ]


def test_one_line_keeps_the_first_line_of_a_driver_message() -> None:
    assert one_line(OSError("refused\nhint")) == "OSError: refused"
    assert one_line(TimeoutError()) == "TimeoutError"
