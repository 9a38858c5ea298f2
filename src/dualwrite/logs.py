"""Log set-up for the long-running commands: one line per event, text or JSON, redacted.

Every line goes through `redact_text` on its way out, whoever logged it (uvicorn's request
lines carry the URL with its query, a driver's error may carry a connection string).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from dualwrite.redact import redact_text


class RedactingFormatter(logging.Formatter):
    """The usual text line, with credentials masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (key=value pairs kept as is)."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        if record.exc_info:
            event["exception"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False)


def configure(verbose: bool, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def one_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message (drivers such as
    psycopg add hint lines)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class OutageLog:
    """The log of one recurring job while what it needs is down: a line when it starts
    failing, then at most one reminder every ``remind_every_s``, and a line when it works
    again. An outage is a few lines, not one traceback per round. The traceback of each
    failure is logged at DEBUG.

    Call `succeeded` only where success proves the dependency answers (a write landed, a
    message arrived); a job that can succeed without touching it just stops failing, and a
    failure after ``remind_every_s`` without any starts a new outage.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        remind_every_s: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._every_s = remind_every_s
        self._now = now
        self._since: float | None = None
        self._said_at = 0.0
        self._last_failure = 0.0
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        now = self._now()
        self._logger.debug("%s failed", self._what, exc_info=error)
        quiet_since_last = now - self._last_failure > self._every_s
        self._last_failure = now
        if self._since is None or quiet_since_last:
            self._since, self._said_at, self._failures = now, now, 0
            self._logger.warning("%s failed: %s", self._what, one_line(error))
            return
        self._failures += 1
        if now - self._said_at >= self._every_s:
            self._logger.warning(
                "%s still failing after %.0f s (%d more failures): %s",
                self._what,
                now - self._since,
                self._failures,
                one_line(error),
            )
            self._said_at, self._failures = now, 0

    def succeeded(self) -> None:
        if self._since is not None:
            self._logger.warning(
                "%s works again after %.0f s", self._what, self._now() - self._since
            )
            self._since = None
