"""The HTTP API: each handler turns a request into one library call and its outcome into a
status code. Authentication and the mapping of library errors live in `api_endpoint`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dualwrite.errors import (
    NOT_SAVED_WARNING,
    SEND_FAILED_TEXT,
    BackendError,
    InvalidInput,
    MessageNotFound,
    SendFailed,
    TextTooLong,
)
from dualwrite.history import DEFAULT_PAGE_SIZE
from dualwrite.model import ChannelMessage, ChannelRef, User, history_cursor
from dualwrite.server.auth import Identity, Unauthorized, bearer_token
from dualwrite.server.ratelimit import Charge, Limit, retry_after_header
from dualwrite.server.state import ServerState, server_state
from dualwrite.validation import check_channel, check_id

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
AuthenticatedHandler = Callable[[Request, Identity], Awaitable[Response]]

_LIMIT = re.compile(r"[0-9]{1,6}")


class ApiError(Exception):
    """An answer other than success, raised from anywhere in a handler."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def response(self) -> Response:
        return JSONResponse(self.body, self.status, headers=self.headers)


def api_endpoint(handler: AuthenticatedHandler) -> Handler:
    """The handler behind a bearer token, with library errors as status codes."""

    async def endpoint(request: Request) -> Response:
        try:
            token = bearer_token(request.headers.get("authorization"))
            identity = await server_state(request).authenticator.identify(token)
            return await handler(request, identity)
        except Unauthorized as error:
            return JSONResponse({"error": "unauthorized", "detail": str(error)}, 401)
        except ApiError as error:
            return error.response()
        except BackendError as error:
            log.warning("backend unavailable: path=%s error=%s", request.url.path, error)
            return JSONResponse({"error": "temporarily unavailable, try again"}, 503)
        except TextTooLong as error:
            return JSONResponse({"error": str(error), "field": error.field}, 413)
        except InvalidInput as error:
            return JSONResponse({"error": str(error), "field": error.field}, 422)

    return endpoint


async def rate_limit(request: Request, *charges: Charge) -> None:
    """Raise a 429 (with `Retry-After`) if a charge is over its limit."""
    state = server_state(request)
    wait_s = await state.limits.wait_s(state.dw, *charges)
    if wait_s:
        raise ApiError(
            429,
            {"error": "too many requests: slow down"},
            headers={"Retry-After": retry_after_header(wait_s)},
        )


def user_key(identity: Identity) -> str:
    return f"{identity.workspace_id}/{identity.user.id}"


def channel_of(request: Request, identity: Identity) -> ChannelRef:
    """The channel in the path, if it is in the caller's workspace (else 403)."""
    channel = check_channel(request.path_params["ws"], request.path_params["ch"])
    if channel.workspace_id != identity.workspace_id:
        raise ApiError(403, {"error": "forbidden: not your workspace"})
    return channel


async def send(request: Request, identity: Identity) -> Response:
    """`POST .../messages`: 201 saved, 202 pending (with the warning), 503 failed to send."""
    channel = channel_of(request, identity)
    state = server_state(request)
    body = await json_body(request, state.settings.max_body_bytes)
    text = body.get("text")
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
    await rate_limit(
        request,
        (Limit.SEND, user_key(identity), 1),
        (Limit.SEND_BYTES, user_key(identity), size),
        (Limit.CHANNEL_BYTES, f"{channel.workspace_id}/{channel.channel_id}", size),
    )
    client_message_id = body.get("clientMessageId")
    if client_message_id is not None and not isinstance(client_message_id, str):
        raise InvalidInput("clientMessageId", "must be a string")
    try:
        result = await state.dw.send_message(
            channel.workspace_id,
            channel.channel_id,
            text,  # type: ignore[arg-type]  # checked by send_message
            identity.user,
            client_message_id=client_message_id,
        )
    except SendFailed as error:
        log.warning(
            "send failed: workspace_id=%s channel_id=%s user_id=%s cause=%r",
            channel.workspace_id,
            channel.channel_id,
            identity.user.id,
            error.__cause__,
        )
        return JSONResponse({"error": SEND_FAILED_TEXT}, 503)
    log.info(
        "send: outcome=%s message_id=%s workspace_id=%s channel_id=%s user_id=%s",
        result.status,
        result.message_id,
        channel.workspace_id,
        channel.channel_id,
        identity.user.id,
    )
    payload: dict[str, Any] = {
        "messageId": result.message_id,
        "status": result.status,
        "timestamp": result.timestamp,
    }
    # A channel first used by a message joins the list too; after the answer, so that a slow
    # store never delays it.
    announce = None
    if state.first_sight(channel.workspace_id, channel.channel_id):
        announce = BackgroundTask(_record_channel, state, channel)
    if result.warning:
        return JSONResponse({**payload, "warning": result.warning}, 202, background=announce)
    return JSONResponse(payload, 201, background=announce)


async def _record_channel(state: ServerState, channel: ChannelRef) -> None:
    try:
        await state.dw.create_channel(channel.workspace_id, channel.channel_id)
    except BackendError as error:
        # Harmless, hence not a warning per send: the channel list also holds every channel
        # with a saved message, and the message is saved once the store is back.
        log.info("channel not recorded: channel=%s error=%s", channel, error)


async def history(request: Request, identity: Identity) -> Response:
    """`GET .../messages?limit=&before=`: a page, newest first, and the next page's cursor."""
    channel = channel_of(request, identity)
    state = server_state(request)
    most = state.settings.max_history
    raw_limit = request.query_params.get("limit", str(DEFAULT_PAGE_SIZE))
    # ASCII digits only, and few: "²".isdigit() is True, and int() refuses 5,000 digits.
    if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= most:
        raise InvalidInput("limit", f"must be a whole number from 1 to {most}")
    await rate_limit(request, (Limit.HISTORY, user_key(identity), 1))
    page = await state.dw.history(
        channel.workspace_id,
        channel.channel_id,
        request.query_params.get("before") or None,
        int(raw_limit),
    )
    shown, next_before = _within_bytes(page.messages, state.settings.max_history_bytes)
    return JSONResponse(
        {"messages": [m.to_wire() for m in shown], "nextBefore": next_before or page.next_before}
    )


def _within_bytes(
    messages: list[ChannelMessage], max_bytes: int
) -> tuple[list[ChannelMessage], str | None]:
    """The first messages whose text and names fit ``max_bytes`` (at least one), and the
    cursor after the last one shown when some were cut."""
    total = 0
    for count, message in enumerate(messages):
        total += len(message.text.encode("utf-8", "surrogatepass")) + len(
            message.user_name.encode("utf-8", "surrogatepass")
        )
        if total > max_bytes and count > 0:
            shown = messages[:count]
            return shown, history_cursor(*shown[-1].sort_key)
    return messages, None


async def retry(request: Request, identity: Identity) -> Response:
    """`POST .../messages/{id}/persist`: the manual retry, with the same id."""
    channel = channel_of(request, identity)
    message_id = check_id("messageId", request.path_params["id"])
    await rate_limit(request, (Limit.PERSIST, user_key(identity), 1))
    try:
        status = await server_state(request).dw.retry(
            message_id, channel.workspace_id, channel.channel_id
        )
    except MessageNotFound:
        return JSONResponse({"error": "no such message (it may have expired)"}, 404)
    if status == "saved":
        return JSONResponse({"messageId": message_id, "status": "saved"}, 200)
    return JSONResponse(
        {"messageId": message_id, "status": "pending", "warning": NOT_SAVED_WARNING}, 202
    )


async def queue(request: Request, identity: Identity) -> Response:
    """`GET /api/queue`: the caller's writes waiting in this process's retry queue."""
    entries = await server_state(request).dw.pending(
        user_id=identity.user.id, workspace_id=identity.workspace_id
    )
    return JSONResponse(
        {
            "pending": [
                {
                    "messageId": e.message_id,
                    "workspaceId": e.write.channel.workspace_id,
                    "channelId": e.write.channel.channel_id,
                    "text": e.write.text,
                    "timestamp": e.write.sent_at,
                    "attempts": e.attempts,
                    "nextAttemptAt": e.next_attempt_at,
                }
                for e in entries
            ]
        }
    )


async def renew(request: Request, identity: Identity) -> Response:
    """`POST /api/auth/renew`: a fresh token for the caller, before theirs expires."""
    await rate_limit(request, (Limit.SIGN_IN, user_key(identity), 1))
    token, expires_at_ms = server_state(request).signer.issue(
        Identity(identity.user, identity.workspace_id)
    )
    return JSONResponse({"token": token, "expiresAt": expires_at_ms})


def workspace_of(request: Request, identity: Identity) -> str:
    """The workspace in the path, if it is the caller's (else 403)."""
    workspace_id = check_id("workspaceId", request.path_params["ws"])
    if workspace_id != identity.workspace_id:
        raise ApiError(403, {"error": "forbidden: not your workspace"})
    return workspace_id


async def channels(request: Request, identity: Identity) -> Response:
    """`GET /api/workspaces/{ws}/channels`: those created and those holding messages."""
    workspace_id = workspace_of(request, identity)
    found = await server_state(request).dw.channels(workspace_id)
    return JSONResponse({"channels": found})


async def create_channel(request: Request, identity: Identity) -> Response:
    """`POST /api/workspaces/{ws}/channels` `{channelId}`: 201, announced to every socket of
    the workspace; creating one that exists is a success too."""
    workspace_id = workspace_of(request, identity)
    state = server_state(request)
    # Channels come out of the sender's allowance too: nobody floods the list.
    await rate_limit(request, (Limit.SEND, user_key(identity), 1))
    body = await json_body(request, state.settings.max_body_bytes)
    channel_id = body.get("channelId")
    if not isinstance(channel_id, str):
        raise InvalidInput("channelId", "must be a string")
    channel = check_channel(workspace_id, channel_id)
    await state.dw.create_channel(channel.workspace_id, channel.channel_id)
    return JSONResponse({"workspaceId": workspace_id, "channelId": channel_id}, 201)


async def dev_token(request: Request) -> Response:
    """`POST /api/dev/token`: the page's development sign-in (only when turned on)."""
    state = server_state(request)
    try:
        client = request.client.host if request.client else "unknown"
        await rate_limit(request, (Limit.SIGN_IN, client, 1))
        body = await json_body(request, state.settings.max_body_bytes)
        identity = Identity(
            User(str(body.get("userId", "")), str(body.get("userName", ""))),
            str(body.get("workspaceId", "")),
        )
        token, expires_at_ms = state.signer.issue(identity)
        return JSONResponse({"token": token, "expiresAt": expires_at_ms})
    except ApiError as error:
        return error.response()
    except InvalidInput as error:
        return JSONResponse({"error": str(error), "field": error.field}, 422)


async def json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, read with a size cap before any parsing."""
    too_large = ApiError(413, {"error": f"request body over {max_bytes} bytes"})
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: deeply nested arrays exhaust the parser's stack.
        raise ApiError(400, {"error": "the body must be a JSON object"}) from None
    if not isinstance(parsed, dict):
        raise ApiError(400, {"error": "the body must be a JSON object"})
    return parsed
