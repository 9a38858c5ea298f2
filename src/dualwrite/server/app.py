"""The ASGI app: HTTP API, WebSocket live delivery, the chat page, metrics.

A thin shell: `create_app` wires the routes to the handlers of `api` and `sockets`, and the
lifespan opens the library (`open_dualwrite`) for as long as the server runs.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import prometheus_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from dualwrite import metrics
from dualwrite.errors import BackendError
from dualwrite.runtime import open_dualwrite
from dualwrite.server import api, sockets
from dualwrite.server.auth import Authenticator, FirebaseIdTokens, TokenSigner
from dualwrite.server.openapi import OPENAPI
from dualwrite.server.ratelimit import RateLimiter
from dualwrite.server.state import ServerState, server_state
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

OpenRuntime = Callable[[], contextlib.AbstractAsyncContextManager[DualWrite]]


def create_app(
    settings: Settings,
    server_settings: ServerSettings,
    *,
    open_runtime: OpenRuntime | None = None,
) -> Starlette:
    """The server app; ``open_runtime`` replaces `open_dualwrite(settings)` (for tests)."""
    secret = server_settings.token_secret
    if secret is None:
        secret = secrets.token_urlsafe(48)
        log.warning(
            "DUALWRITE_TOKEN_SECRET is not set: using a random secret; tokens end with "
            "this process and are not shared with other servers"
        )
    signer = TokenSigner(secret)
    firebase = server_settings.firebase_project
    state = ServerState(
        settings=server_settings,
        signer=signer,
        authenticator=Authenticator(signer, FirebaseIdTokens(firebase) if firebase else None),
        limiter=RateLimiter(server_settings.send_rate_per_s, server_settings.send_burst),
    )
    opener = open_runtime or (lambda: open_dualwrite(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with opener() as runtime:
            state.started(runtime)
            yield

    messages = "/api/workspaces/{ws}/channels/{ch}/messages"
    routes = [
        Route("/", page),
        Route("/healthz", health),
        Route("/metrics", metrics_endpoint),
        Route("/openapi.json", openapi),
        Route(messages, api.api_endpoint(api.send), methods=["POST"]),
        Route(messages, api.api_endpoint(api.history), methods=["GET"]),
        Route(messages + "/{id}/persist", api.api_endpoint(api.retry), methods=["POST"]),
        Route("/api/queue", api.api_endpoint(api.queue), methods=["GET"]),
        WebSocketRoute("/ws/workspaces/{ws}/channels/{ch}", sockets.live),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if server_settings.dev_sign_in_enabled:
        routes.append(Route("/api/dev/token", api.dev_token, methods=["POST"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = state
    return app


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    # Before the lifespan there is no queue to count yet; a queue that does not answer within
    # its bound leaves the last depth, rather than failing the scrape.
    with contextlib.suppress(RuntimeError, BackendError):
        metrics.QUEUE_DEPTH.set(await server_state(request).dw.queue_depth())
    return Response(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )
