"""The ASGI app: HTTP API, WebSocket live delivery, the chat page, metrics. A thin shell:
it turns requests into library calls and library errors into status codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from dualwrite import metrics
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
from dualwrite.runtime import DualWrite, open_dualwrite
from dualwrite.server.auth import (
    Authenticator,
    FirebaseIdTokens,
    Identity,
    TokenSigner,
    Unauthorized,
    bearer_token,
)
from dualwrite.server.live import LiveHub, Overflowed
from dualwrite.server.openapi import OPENAPI
from dualwrite.server.ratelimit import RateLimiter, retry_after_header
from dualwrite.settings import Settings
from dualwrite.validation import check_channel, check_id

log = logging.getLogger("dualwrite.server")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 256 * 1024
WS_AUTH_TIMEOUT_S = 5.0


@dataclass
class ServerConfig:
    token_secret: str
    dev_sign_in: bool = False
    """Serve `POST /api/dev/token` (the page's sign-in form). Development only."""
    max_history: int = 200
    send_rate_per_s: float = 10.0
    """Per-user sends a second (token bucket, per process); 0 turns the limit off."""
    send_burst: int = 20
    firebase_project: str | None = None
    """Also accept Firebase ID tokens of this project (uid, name, `workspaceId` claim)."""


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    settings: Settings,
    config: ServerConfig,
    *,
    open_runtime: Callable[[], contextlib.AbstractAsyncContextManager[DualWrite]] | None = None,
) -> Starlette:
    """The server app; ``open_runtime`` replaces `open_dualwrite(settings)` (for tests)."""
    limiter = RateLimiter(config.send_rate_per_s, config.send_burst)
    signer = TokenSigner(config.token_secret)
    authenticator = Authenticator(
        signer, FirebaseIdTokens(config.firebase_project) if config.firebase_project else None
    )
    state: dict[str, Any] = {}

    def dw() -> DualWrite:
        runtime: DualWrite = state["dw"]
        return runtime

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opener = open_runtime or (lambda: open_dualwrite(settings))
        async with opener() as runtime:
            state["dw"] = runtime
            state["hub"] = LiveHub(runtime)
            yield

    def api(handler: Callable[[Request, Identity], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                token = bearer_token(request.headers.get("authorization"))
                identity = await authenticator.identify(token)
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
        channel = check_channel(request.path_params["ws"], request.path_params["ch"])
        if channel.workspace_id != identity.workspace_id:
            raise ApiError(403, {"error": "forbidden: not your workspace"})
        return channel

    async def send(request: Request, identity: Identity) -> Response:
        channel = channel_of(request, identity)
        wait_s = limiter.acquire((identity.workspace_id, identity.user.id))
        if wait_s:
            return JSONResponse(
                {"error": "too many messages: slow down"},
                429,
                headers={"Retry-After": retry_after_header(wait_s)},
            )
        body = await json_body(request)
        text = body.get("text")
        client_message_id = body.get("clientMessageId")
        if client_message_id is not None and not isinstance(client_message_id, str):
            raise InvalidInput("clientMessageId", "must be a string")
        try:
            result = await dw().send_message(
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
        if result.warning:
            payload["warning"] = result.warning
            return JSONResponse(payload, 202)
        return JSONResponse(payload, 201)

    async def history(request: Request, identity: Identity) -> Response:
        channel = channel_of(request, identity)
        raw_limit = request.query_params.get("limit", "50")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= config.max_history:
            raise InvalidInput("limit", f"must be a whole number from 1 to {config.max_history}")
        page = await dw().history(
            channel.workspace_id,
            channel.channel_id,
            request.query_params.get("before") or None,
            int(raw_limit),
        )
        return JSONResponse(
            {"messages": [m.to_wire() for m in page.messages], "nextBefore": page.next_before}
        )

    async def persist(request: Request, identity: Identity) -> Response:
        channel = channel_of(request, identity)
        message_id = check_id("messageId", request.path_params["id"])
        try:
            status = await dw().persist(channel.workspace_id, channel.channel_id, message_id)
        except MessageNotFound:
            return JSONResponse({"error": "no such message (it may have expired)"}, 404)
        if status == "saved":
            return JSONResponse({"messageId": message_id, "status": "saved"}, 200)
        return JSONResponse(
            {"messageId": message_id, "status": "pending", "warning": NOT_SAVED_WARNING}, 202
        )

    async def queue(request: Request, identity: Identity) -> Response:
        entries = await dw().pending(user_id=identity.user.id)
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
                    if e.write.channel.workspace_id == identity.workspace_id
                ]
            }
        )

    async def dev_token(request: Request) -> Response:
        body = await json_body(request)
        try:
            identity = Identity(
                User(str(body.get("userId", "")), str(body.get("userName", ""))),
                str(body.get("workspaceId", "")),
            )
            return JSONResponse({"token": signer.mint(identity)})
        except InvalidInput as error:
            return JSONResponse({"error": str(error), "field": error.field}, 422)

    async def live(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            identity = await websocket_identity(websocket)
        except Unauthorized as error:
            await websocket.close(4401, reason=str(error)[:100])
            return
        try:
            channel = check_channel(websocket.path_params["ws"], websocket.path_params["ch"])
            after = websocket.query_params.get("after") or None
            if after is not None:
                check_id("after", after)
        except InvalidInput as error:
            await websocket.close(4422, reason=str(error)[:100])
            return
        if channel.workspace_id != identity.workspace_id:
            await websocket.close(4403, reason="forbidden: not your workspace")
            return
        metrics.WEBSOCKETS.inc()
        try:
            async with state["hub"].listen(channel, after) as frames:

                async def forward() -> None:
                    async for frame in frames:
                        await websocket.send_text(frame)

                sender = asyncio.create_task(forward())
                reader = asyncio.create_task(_drain_client(websocket))
                done, pending = await asyncio.wait(
                    {sender, reader}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if sender in done and isinstance(sender.exception(), Overflowed):
                    await websocket.close(1013, reason="too slow: reconnect with ?after=<last id>")
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            metrics.WEBSOCKETS.dec()

    async def websocket_identity(websocket: WebSocket) -> Identity:
        token = websocket.query_params.get("token")
        if not token:
            try:
                first = await asyncio.wait_for(websocket.receive_text(), WS_AUTH_TIMEOUT_S)
                token = str(json.loads(first).get("token", ""))
            except (TimeoutError, ValueError, AttributeError, WebSocketDisconnect):
                raise Unauthorized('send {"token": ...} as the first frame') from None
        return await authenticator.identify(token)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def metrics_endpoint(request: Request) -> Response:
        if "dw" in state:
            metrics.QUEUE_DEPTH.set(await dw().queue.count())
        return Response(
            prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/", page),
        Route("/healthz", health),
        Route("/metrics", metrics_endpoint),
        Route("/openapi.json", openapi),
        Route("/api/workspaces/{ws}/channels/{ch}/messages", api(send), methods=["POST"]),
        Route("/api/workspaces/{ws}/channels/{ch}/messages", api(history), methods=["GET"]),
        Route(
            "/api/workspaces/{ws}/channels/{ch}/messages/{id}/persist",
            api(persist),
            methods=["POST"],
        ),
        Route("/api/queue", api(queue), methods=["GET"]),
        WebSocketRoute("/ws/workspaces/{ws}/channels/{ch}", live),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if config.dev_sign_in:
        routes.append(Route("/api/dev/token", dev_token, methods=["POST"]))
    return Starlette(routes=routes, lifespan=lifespan)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read with a size cap before any parsing."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, {"error": "the body must be a JSON object"}) from None
    if not isinstance(parsed, dict):
        raise ApiError(400, {"error": "the body must be a JSON object"})
    return parsed


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so a close is noticed at once."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
