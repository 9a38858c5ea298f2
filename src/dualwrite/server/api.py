"""The HTTP API: each handler turns a request into one library call and its outcome into a
status code. Authentication and the mapping of library errors live in `api_endpoint`."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

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
from dualwrite.model import ChannelRef, User
from dualwrite.server.auth import Identity, Unauthorized, bearer_token
from dualwrite.server.ratelimit import retry_after_header
from dualwrite.server.state import server_state
from dualwrite.validation import check_channel, check_id

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
AuthenticatedHandler = Callable[[Request, Identity], Awaitable[Response]]


class ApiError(Exception):
    """An answer other than success, raised from anywhere in a handler."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


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
            return JSONResponse(error.body, error.status)
        except BackendError as error:
            log.warning("backend unavailable: path=%s error=%s", request.url.path, error)
            return JSONResponse({"error": "temporarily unavailable, try again"}, 503)
        except TextTooLong as error:
            return JSONResponse({"error": str(error), "field": error.field}, 413)
        except InvalidInput as error:
            return JSONResponse({"error": str(error), "field": error.field}, 422)

    return endpoint


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
    wait_s = state.limiter.acquire((identity.workspace_id, identity.user.id))
    if wait_s:
        return JSONResponse(
            {"error": "too many messages: slow down"},
            429,
            headers={"Retry-After": retry_after_header(wait_s)},
        )
    body = await json_body(request, state.settings.max_body_bytes)
    client_message_id = body.get("clientMessageId")
    if client_message_id is not None and not isinstance(client_message_id, str):
        raise InvalidInput("clientMessageId", "must be a string")
    try:
        result = await state.dw.send_message(
            channel.workspace_id,
            channel.channel_id,
            body.get("text"),  # type: ignore[arg-type]  # checked by send_message
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
    if result.warning:
        return JSONResponse({**payload, "warning": result.warning}, 202)
    return JSONResponse(payload, 201)


async def history(request: Request, identity: Identity) -> Response:
    """`GET .../messages?limit=&before=`: a page, newest first, and the next page's cursor."""
    channel = channel_of(request, identity)
    state = server_state(request)
    most = state.settings.max_history
    raw_limit = request.query_params.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= most:
        raise InvalidInput("limit", f"must be a whole number from 1 to {most}")
    page = await state.dw.history(
        channel.workspace_id,
        channel.channel_id,
        request.query_params.get("before") or None,
        int(raw_limit),
    )
    return JSONResponse(
        {"messages": [m.to_wire() for m in page.messages], "nextBefore": page.next_before}
    )


async def retry(request: Request, identity: Identity) -> Response:
    """`POST .../messages/{id}/persist`: the manual retry, with the same id."""
    channel = channel_of(request, identity)
    message_id = check_id("messageId", request.path_params["id"])
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


async def dev_token(request: Request) -> Response:
    """`POST /api/dev/token`: the page's development sign-in (only when turned on)."""
    state = server_state(request)
    try:
        body = await json_body(request, state.settings.max_body_bytes)
        identity = Identity(
            User(str(body.get("userId", "")), str(body.get("userName", ""))),
            str(body.get("workspaceId", "")),
        )
        return JSONResponse({"token": state.signer.mint(identity)})
    except ApiError as error:
        return JSONResponse(error.body, error.status)
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
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, {"error": "the body must be a JSON object"}) from None
    if not isinstance(parsed, dict):
        raise ApiError(400, {"error": "the body must be a JSON object"})
    return parsed
