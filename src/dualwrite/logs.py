"""Log set-up for the long-running commands: one line per event, text or JSON, redacted.

Every line goes through `redact_text` on its way out, whoever logged it (uvicorn's request
lines carry the URL with its query, a driver's error may carry a connection string).
"""

from __future__ import annotations

import json
import logging
import time

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
