"""Where a permanent-write failure is reported: the log and Sentry (a no-op without a DSN)."""

from __future__ import annotations

import logging

import sentry_sdk

from dualwrite.model import PermanentWrite

log = logging.getLogger(__name__)


def report_permanent_failure(write: PermanentWrite, error: BaseException) -> None:
    log.warning(
        "permanent write failed, queued for retry: message_id=%s workspace_id=%s "
        "channel_id=%s error=%r",
        write.message_id,
        write.channel.workspace_id,
        write.channel.channel_id,
        error,
    )
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("workspace_id", write.channel.workspace_id)
        scope.set_tag("channel_id", write.channel.channel_id)
        scope.set_tag("message_id", write.message_id)
        scope.set_tag("dualwrite.stage", "permanent_write")
        sentry_sdk.capture_exception(error)


def init_sentry(dsn: str | None) -> None:
    """Turn on sentry-sdk when a DSN is set; its integrations (Starlette...) auto-enable."""
    if dsn and not sentry_sdk.is_initialized():
        sentry_sdk.init(dsn=dsn, send_default_pii=False)
