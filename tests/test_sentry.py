"""A permanent-write failure reaches Sentry, through a real sentry_sdk client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from dualwrite import User
from dualwrite.reporting import sentry_options
from tests.conftest import Harness, unique


class CapturingTransport(Transport):
    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            event = item.get_event()
            if event is not None:
                self.events.append(dict(event))


@pytest.fixture
def sentry_events() -> Iterator[list[dict[str, Any]]]:
    transport = CapturingTransport()
    sentry_sdk.init(dsn="https://public@sentry.invalid/1", transport=transport)
    try:
        yield transport.events
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()


async def test_permanent_failure_is_captured_with_the_message_tags(
    harness: Harness, sentry_events: list[dict[str, Any]]
) -> None:
    workspace, channel = unique("ws"), unique("ch")
    harness.store_faults.fail()
    result = await harness.dw.send_message(workspace, channel, "hi", User("u1", "Ada"))
    sentry_sdk.flush()
    [event] = sentry_events
    assert event["tags"]["message_id"] == result.message_id
    assert event["tags"]["workspace_id"] == workspace
    assert event["tags"]["channel_id"] == channel
    [exception] = event["exception"]["values"]
    assert exception["type"] == "InjectedFault"


async def test_realtime_failure_is_not_a_sentry_event(
    harness: Harness, sentry_events: list[dict[str, Any]]
) -> None:
    harness.realtime_faults.fail()
    with pytest.raises(Exception, match="Retry"):
        await harness.dw.send_message("ws", "ch", "hi", User("u1", "Ada"))
    sentry_sdk.flush()
    assert sentry_events == []


async def test_sentry_events_carry_no_text_name_or_token(
    harness: Harness, scrubbed_sentry_events: list[dict[str, Any]]
) -> None:
    harness.store_faults.fail()
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl"
    with sentry_sdk.new_scope() as scope:
        scope.set_context("request", {})
        scope.add_breadcrumb(category="httpx", message=f"GET http://h/ws?token={token}")
        await harness.dw.send_message(
            unique("ws"), unique("ch"), "TOP-SECRET-TEXT", User("u1", "Secret-Name")
        )
    sentry_sdk.flush()
    [event] = scrubbed_sentry_events
    printed = repr(event)
    assert "InjectedFault" in printed
    for leak in ("TOP-SECRET-TEXT", "Secret-Name", token):
        assert leak not in printed


@pytest.fixture
def scrubbed_sentry_events() -> Iterator[list[dict[str, Any]]]:
    """Sentry as `init_sentry` configures it, captured in memory."""
    transport = CapturingTransport()
    sentry_sdk.init(dsn="https://public@sentry.invalid/1", transport=transport, **sentry_options())
    try:
        yield transport.events
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()
