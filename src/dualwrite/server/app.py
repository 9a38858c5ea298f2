"""The ASGI app: HTTP API, WebSocket live delivery, the chat page, metrics.

A thin shell: `create_app` wires the routes to the handlers of `api` and `sockets`, and the
lifespan opens the library (`open_dualwrite`) for as long as the server runs.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from dualwrite.errors import BadSetting
from dualwrite.runtime import open_dualwrite
from dualwrite.server import api, sockets
from dualwrite.server.auth import (
    Authenticator,
    FirebaseIdTokens,
    TokenSigner,
    auth_emulator_host,
)
from dualwrite.server.collector import short_full_collections
from dualwrite.server.openapi import OPENAPI
from dualwrite.server.ratelimit import RateLimits
from dualwrite.server.security import HostCheck, HostPolicy, SecurityHeaders, is_loopback
from dualwrite.server.state import ServerState
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
    """The server app; ``open_runtime`` replaces `open_dualwrite(settings)` (for tests).

    Raises `BadSetting` for a configuration that would open the server to anyone: dev sign-in
    off a loopback bind, or an Auth emulator in the environment without its flag.
    """
    check_exposure(server_settings)
    secret = server_settings.token_secret
    if secret is None:
        secret = secrets.token_urlsafe(48)
        log.warning(
            "DUALWRITE_TOKEN_SECRET is not set: using a random secret; tokens end with "
            "this process and are not shared with other servers"
        )
    signer = TokenSigner(secret, server_settings)
    firebase = None
    if server_settings.firebase_project:
        firebase = FirebaseIdTokens(
            server_settings.firebase_project,
            server_settings.token_max_lifetime_s,
            emulated=server_settings.firebase_auth_emulator,
        )
    state = ServerState(
        settings=server_settings,
        signer=signer,
        authenticator=Authenticator(signer, firebase),
        limits=RateLimits(server_settings, time.monotonic),
    )
    opener = open_runtime or (lambda: open_dualwrite(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            opener() as runtime,
            short_full_collections(server_settings.gc_thaw_s),
        ):
            state.started(runtime)
            yield

    channels = "/api/workspaces/{ws}/channels"
    messages = channels + "/{ch}/messages"
    routes = [
        Route("/", page),
        Route("/healthz", health),
        Route("/openapi.json", openapi),
        Route(messages, api.api_endpoint(api.send), methods=["POST"]),
        Route(messages, api.api_endpoint(api.history), methods=["GET"]),
        Route(messages + "/{id}/persist", api.api_endpoint(api.retry), methods=["POST"]),
        Route("/api/queue", api.api_endpoint(api.queue), methods=["GET"]),
        Route("/api/auth/renew", api.api_endpoint(api.renew), methods=["POST"]),
        Route(channels, api.api_endpoint(api.channels), methods=["GET"]),
        Route(channels, api.api_endpoint(api.create_channel), methods=["POST"]),
        WebSocketRoute("/ws/workspaces/{ws}/channels/{ch}", sockets.live),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if server_settings.metrics_token:
        routes.append(Route("/metrics", metrics_behind_token(server_settings.metrics_token)))
    if server_settings.dev_sign_in:
        routes.append(Route("/api/dev/token", api.dev_token, methods=["POST"]))
    app = _App(
        HostPolicy(server_settings.host, server_settings.extra_hosts),
        routes=routes,
        lifespan=lifespan,
        # Outermost first: the Host check's refusals carry the security headers too.
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                HostCheck, policy=HostPolicy(server_settings.host, server_settings.extra_hosts)
            ),
        ],
    )
    app.state.server = state
    return app


_LIVE_SOCKET = re.compile(r"/ws/workspaces/(?P<ws>[^/]+)/channels/(?P<ch>[^/]+)")
"""The path of `sockets.live`, as the route matches it."""


class _App(Starlette):
    """The app, with live sockets taken ahead of the middleware stack.

    A socket stays in its handler for as long as it is open, and so does every layer it came
    through: through Starlette's stack (error and exception middleware, the Host check, the
    router, the route, two exception wrappers) that is a dozen suspended frames and closures,
    some 5 KB per socket, for nothing a socket uses after its handshake. A live socket whose
    Host is allowed goes straight to `sockets.live`; anything else (a refused Host, another
    path, a root path) takes the usual way.
    """

    def __init__(self, hosts: HostPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and (params := self._live_socket(scope)) is not None:
            scope["app"] = self
            scope["path_params"] = params
            await sockets.live(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)

    def _live_socket(self, scope: Scope) -> dict[str, str] | None:
        """The path parameters of a live socket this server takes, or None."""
        if scope.get("root_path"):
            return None
        found = _LIVE_SOCKET.fullmatch(scope["path"])
        if found is None or not self._hosts.allows(Headers(scope=scope).get("host")):
            return None
        return found.groupdict()


def check_exposure(server_settings: ServerSettings) -> None:
    """Refuse the settings that would let anyone in; log the development ones that are on."""
    if server_settings.dev_sign_in and not is_loopback(server_settings.host):
        raise BadSetting(
            f"--dev-sign-in lets anyone sign in as anyone: it is refused on {server_settings.host}"
            " (bind to 127.0.0.1, or configure DUALWRITE_TOKEN_SECRET and mint tokens)"
        )
    if server_settings.dev_sign_in and "*" in server_settings.extra_hosts:
        raise BadSetting(
            "--dev-sign-in with --allowed-host '*' would let any web page a developer visits "
            "sign in to this server (DNS rebinding): name the hosts instead"
        )
    emulator = auth_emulator_host()
    if server_settings.firebase_project and emulator:
        if not server_settings.firebase_auth_emulator:
            raise BadSetting(
                f"FIREBASE_AUTH_EMULATOR_HOST={emulator} would make the server accept unsigned "
                "Firebase tokens for anyone: unset it, or pass --firebase-auth-emulator "
                "(development only)"
            )
        log.warning(
            "FIREBASE AUTH EMULATOR: accepting UNSIGNED Firebase tokens from %s (development only)",
            emulator,
        )
    if server_settings.dev_sign_in:
        log.warning(
            "DEVELOPMENT SIGN-IN IS ON: anyone who reaches this server can sign in as anyone"
        )


def metrics_app() -> Starlette:
    """`/metrics` alone, for its own bind (`--metrics-host`)."""
    return Starlette(routes=[Route("/metrics", metrics_endpoint)])


def metrics_behind_token(token: str) -> Callable[[Request], Awaitable[Response]]:
    expected = f"Bearer {token}".encode()

    async def endpoint(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"error": "unauthorized"}, 401)
        return await metrics_endpoint(request)

    return endpoint


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    # Gauges are kept current by the code that changes them (the queue depth by the send
    # path and the retrier): a scrape reads memory, never a backend.
    return Response(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )
