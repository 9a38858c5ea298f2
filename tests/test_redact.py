"""Credentials never leave the process in printed URLs, log lines or Sentry events."""

from __future__ import annotations

import logging

import pytest

from dualwrite.logs import JsonFormatter, RedactingFormatter
from dualwrite.redact import redact_text, redact_url

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("url", "printed"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        (
            "postgresql://u@h/db?password=secret&schema=s",
            "postgresql://u@h/db?password=***&schema=s",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("memory://", "memory://"),
        ("sqlite:///dualwrite-data/messages.db", "sqlite:///dualwrite-data/messages.db"),
    ],
)
def test_urls_are_printed_without_their_credentials(url: str, printed: str) -> None:
    assert redact_url(url) == printed


def test_text_loses_tokens_passwords_and_jwts() -> None:
    line = (
        f'127.0.0.1:5 - "WebSocket /ws/workspaces/a/channels/b?after=-x&token={JWT}" [accepted] '
        f"Authorization: Bearer {JWT} dsn=postgresql://u:pw@h/db access_token=abc"
    )
    redacted = redact_text(line)
    for secret in (JWT, "pw@", "abc"):
        assert secret not in redacted
    assert "after=-x" in redacted and "postgresql://u:***@h/db" in redacted


@pytest.mark.parametrize("formatter", [RedactingFormatter("%(message)s"), JsonFormatter()])
def test_every_log_line_is_redacted(formatter: logging.Formatter) -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '"GET /x?token=%s"', (JWT,), None
    )
    assert JWT not in formatter.format(record)


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("GET /ws?TOKEN=abc HTTP/1.1", "GET /ws?TOKEN=*** HTTP/1.1"),
        # What matching without regard to case takes as "password" and "key" (the long s,
        # the Kelvin sign): a name spelled so is masked all the same.
        ("login pa\u017f\u017fword=hunter2", "login pa\u017f\u017fword=***"),
        ("x \u212aey=abc", "x \u212aey=***"),
        ("authorization: bEaReR\tabc.def", "authorization: bEaReR\t***"),
        (
            "send: outcome=saved message_id=-Oab user_id=u1",
            "send: outcome=saved message_id=-Oab user_id=u1",
        ),
    ],
)
def test_credentials_are_masked_in_any_case(text: str, printed: str) -> None:
    assert redact_text(text) == printed
