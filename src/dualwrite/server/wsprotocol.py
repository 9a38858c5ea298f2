"""uvicorn's sans-I/O WebSocket protocol, holding less per open socket.

A `serve` process holds thousands of idle sockets, and what each costs is mostly the server's
per-connection state. uvicorn's `WebSocketsSansIOProtocol` (the one it picks by default with
websockets installed: no task of its own per socket, keepalive pings on timers) keeps, for the
whole life of a socket, the handshake's request and response (with their headers, which
websockets' parser holds on to as well, and the scope a copy of them) and an `asyncio.Queue`
for the few events the app receives (four deques). This subclass empties and lets go the
handshake's headers (and query) once it is answered, queues the events in a list and flags
writability without an `asyncio.Event`: the same protocol, frames, pings, limits
(`ws_max_size`) and flow control, some 12 KB less per socket with a browser's headers.

It also closes a socket it must fail (a frame over `ws_max_size`, bad UTF-8) the way a TCP peer
should when the other side may still be sending: the close frame is written, the write side
shut (FIN), and what still arrives is read and dropped until the client closes or a short
linger ends. uvicorn closes at once; data arriving at a closed socket makes the kernel answer
with a reset, and a reset can discard the close frame before the client reads it, so a client
that sent 16 MB saw "connection reset" instead of 1009 about one time in three.

Once a socket is accepted, the app finds `send_text_now` in the scope's extensions
(`SEND_TEXT_NOW`): the frame written at once, without the ASGI send's coroutines, when the
socket can take it without waiting; live delivery writes most frames so.

It depends on uvicorn's internals (`queue`, `writable`, `request`, `response`, `scope`):
`tests/server/test_wsprotocol.py` checks them on the pinned uvicorn, so an upgrade that changes
them fails there, not in production.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

SEND_TEXT_NOW = "dualwrite.send_text_now"
"""The scope extension holding an accepted socket's `LeanWebSocketProtocol.send_text_now`."""


class _Events:
    """What `asyncio.Queue` offers uvicorn here (`put_nowait`, `get`, `empty`), for the one
    consumer a socket has (the app's `receive`): a list, and a future only while it waits."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class _Flag:
    """What `asyncio.Event` offers uvicorn here (`set`, `clear`, `wait`): its waiters' list is
    made only when one waits (a socket whose client stops reading)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


# Long enough for a client on a slow link to finish the frame it was sending and read the
# close; short enough that a peer that never stops sending holds nothing for long.
LINGER_S = 2.0


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """`WebSocketsSansIOProtocol` without the handshake kept, with a lighter event queue and
    write flag, and a lingering close when a frame is refused."""

    # A class default: a socket pays for the attribute only once it lingers.
    lingering = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Events()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]

    def send_text_now(self, text: str) -> bool:
        """Write a text frame at once if the socket can take it without waiting: True if
        written; False (nothing written) while the client is not reading (flow control) or the
        socket is closing, where the ASGI send waits, or fails, as it should."""
        if (
            self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.transport.is_closing()
        ):
            return False
        try:
            self.conn.send_text(text.encode())
        except InvalidState:  # the client's close arrived: the ASGI send says so
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # The scope holds the bound method, which holds the protocol: no cycle outlives it.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.get("extensions", {}).pop(SEND_TEXT_NOW, None)
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and self.request is not None:
            if message["type"] == "websocket.accept" and not self.disconnected:
                extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
                extensions[SEND_TEXT_NOW] = self.send_text_now
            # Read only while answering the handshake (accept, reject, or an HTTP response).
            # websockets' parser keeps the request in its generator's frame for the life of
            # the socket, so its headers are emptied, not only let go (about 5 KB a socket);
            # the scope's copy of them too (2 KB). The query goes as well: it may hold a
            # `?token=`. The app reads what it needs of both before it accepts.
            self.request.headers.clear()
            self.request.path = self.request.path.partition("?")[0]
            self.scope["headers"] = []
            self.scope["query_string"] = b""
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the close is sent: what the peer still sends is dropped unread
        super().data_received(data)
        refused = self.conn.handshake_exc is not None and not self.handshake_initiated
        if refused and not self.transport.is_closing():
            # websockets refused the handshake (a header line over 8 KB, over 128 headers, not
            # HTTP) and queued its answer (431, 414, or none): uvicorn never sends it, and the
            # connection stayed open, answered by nothing and counted against no cap.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                # uvicorn closes with 1007 too, but logs a traceback at ERROR, which Sentry's
                # logging integration reports: one event per hostile frame, on our quota.
                self.frames = []
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        assert self.conn.close_sent is not None
        self.queue.put_nowait(
            {
                "type": "websocket.disconnect",
                "code": self.conn.close_sent.code,
                "reason": self.conn.close_sent.reason,
            }
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if not self.transport.can_write_eof():  # TLS: no half-close to offer
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering = True
        self.transport.resume_reading()
        # connection_lost cancels this timer when the peer closes first.
        self.close_timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
