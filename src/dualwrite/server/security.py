"""HTTP-level guards of the server: the `Host` check and the security headers of every answer.

The `Host` check defeats DNS rebinding (a web page whose name is re-pointed at 127.0.0.1
reaching a developer's server): a request must name the bind address, a loopback name on a
loopback bind, an IP literal on a wildcard bind (rebinding needs a DNS name), or one of
`--allowed-host`.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    # No inline script, nothing from elsewhere, never framed.
    "content-security-policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}

_LOOPBACK_NAMES = ("localhost", "localhost.")
_WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


class HostPolicy:
    """Which `Host` header names this server answers to."""

    def __init__(self, bind_host: str, extra: list[str]) -> None:
        self._any = "*" in extra
        self._loopback = is_loopback(bind_host)
        self._wildcard = bind_host in _WILDCARDS
        self._names = {bind_host.lower().strip("[]"), *(h.lower().strip("[]") for h in extra)}

    def allows(self, host_header: str | None) -> bool:
        if self._any:
            return True
        if not host_header:
            return False
        name = _host_name(host_header)
        if name in self._names:
            return True
        if self._loopback:
            return name in _LOOPBACK_NAMES or (_ip_literal(name) and is_loopback(name))
        return self._wildcard and _ip_literal(name)


_HOST_HEADER = re.compile(r"\[([0-9a-f:.]+)\](?::\d{1,5})?|([a-z0-9._-]+)(?::\d{1,5})?")


def _host_name(host_header: str) -> str:
    """The name of a `Host` header (`name`, `name:port`, `[v6]`, `[v6]:port`); "" (never
    allowed) for anything else, such as `[::1]evil.com`, which must not pass for `::1`."""
    found = _HOST_HEADER.fullmatch(host_header.strip().lower())
    return (found.group(1) or found.group(2)) if found else ""


class HostCheck:
    """Refuse requests and sockets whose `Host` the policy does not allow (400 / 403)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.policy.allows(
            Headers(scope=scope).get("host")
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "bad Host"})
            return
        response = PlainTextResponse("Invalid Host header", 400)
        await response(scope, receive, send)


class SecurityHeaders:
    """Add `SECURITY_HEADERS` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
