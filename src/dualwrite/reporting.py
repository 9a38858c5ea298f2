"""Where a permanent-write failure is reported: the log and Sentry (a no-op without a DSN).

Sentry events leave the process with no credential, no message text and no user name: stack
locals are off, and `scrub_event` drops request bodies, cookies and auth headers, masks
credentials in every string it keeps, and cuts database error details (which quote rows).
"""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk

from dualwrite.model import PermanentWrite
from dualwrite.redact import MASK, redact_text

log = logging.getLogger(__name__)

# Parts of an event that may hold what a user typed or who they are.
_DROPPED_REQUEST_KEYS = ("data", "cookies")
_SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "x-api-key", "proxy-authorization"})
# Database errors quote the failing row (text, user name) after these words.
_DETAIL_MARKERS = ("DETAIL:", "Failing row contains", "Key (")


def report_permanent_failure(write: PermanentWrite, error: BaseException) -> None:
    log.warning(
        "permanent write failed, queued for retry: message_id=%s workspace_id=%s "
        "channel_id=%s error=%s",
        write.message_id,
        write.channel.workspace_id,
        write.channel.channel_id,
        _cut_details(repr(error)),
    )
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("workspace_id", write.channel.workspace_id)
        scope.set_tag("channel_id", write.channel.channel_id)
        scope.set_tag("message_id", write.message_id)
        scope.set_tag("dualwrite.stage", "permanent_write")
        sentry_sdk.capture_exception(error)


def sentry_options() -> dict[str, Any]:
    """The options every `sentry_sdk.init` of dualwrite uses (besides the DSN)."""
    return {
        # sentry-sdk's structured successor of send_default_pii=False, stricter: no user, no
        # cookies, no query parameters, no bodies, no stack locals (they hold message text).
        "data_collection": {
            "user_info": False,
            "cookies": {"mode": "off"},
            "http_headers": {"request": {"mode": "denylist"}},
            "http_bodies": [],
            "url_query_params": {"mode": "off"},
            "graphql": {"document": False, "variables": False},
            "gen_ai": {"inputs": False, "outputs": False},
            "database_query_data": False,
            "queues": False,
            "stack_frame_variables": False,
        },
        "include_local_variables": False,
        "max_request_body_size": "never",
        "before_send": scrub_event,
        "before_send_transaction": scrub_event,
        "before_breadcrumb": scrub_breadcrumb,
    }


def init_sentry(dsn: str | None) -> None:
    """Turn on sentry-sdk when a DSN is set; its integrations (Starlette...) auto-enable."""
    if dsn and not sentry_sdk.is_initialized():
        sentry_sdk.init(dsn=dsn, **sentry_options())


def scrub_event(event: Any, hint: Any) -> Any:
    """`before_send`: the event without secrets, message text or names."""
    event.pop("user", None)
    request = event.get("request")
    if isinstance(request, dict):
        for key in _DROPPED_REQUEST_KEYS:
            request.pop(key, None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            for name in list(headers):
                if name.lower() in _SENSITIVE_HEADERS:
                    headers[name] = MASK
    for exception in (event.get("exception") or {}).get("values") or []:
        if isinstance(exception.get("value"), str):
            exception["value"] = _cut_details(exception["value"])
        for frame in (exception.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    for thread in (event.get("threads") or {}).get("values") or []:
        for frame in (thread.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    breadcrumbs = event.get("breadcrumbs")
    if isinstance(breadcrumbs, dict):
        breadcrumbs["values"] = [
            scrub_breadcrumb(crumb, None) for crumb in breadcrumbs.get("values") or []
        ]
    return _redact_strings(event)


def scrub_breadcrumb(crumb: Any, hint: Any) -> Any:
    """`before_breadcrumb`: log and HTTP breadcrumbs with credentials masked."""
    return _redact_strings(crumb)


def _cut_details(text: str) -> str:
    for marker in _DETAIL_MARKERS:
        at = text.find(marker)
        if at >= 0:
            text = text[:at] + marker + " [scrubbed]"
    return text


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return value
