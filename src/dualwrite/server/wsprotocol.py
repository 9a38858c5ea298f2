"""uvicorn's sans-I/O WebSocket protocol, holding less per open socket.

A `serve` process holds thousands of idle sockets, and what each costs is mostly the server's
per-connection state. uvicorn's `WebSocketsSansIOProtocol` (the one it picks by default with
websockets installed: no task of its own per socket, keepalive pings on timers) keeps, for the
whole life of a socket, the handshake's request and response (with their headers) and an
`asyncio.Queue` for the few events the app receives (four deques). This subclass lets the
handshake go once it is answered, queues the events in a list and flags writability without
an `asyncio.Event`: the same protocol, frames, pings, limits (`ws_max_size`) and flow control,
some 5 KB less per socket.

It depends on uvicorn's internals (`queue`, `writable`, `request`, `response`):
`tests/server/test_wsprotocol.py` checks them on the pinned uvicorn, so an upgrade that changes
them fails there, not in production.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


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


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """`WebSocketsSansIOProtocol` without the handshake kept, and with a lighter event queue
    and write flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Events()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete:
            # Read only while answering the handshake (accept, reject, or an HTTP response).
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
