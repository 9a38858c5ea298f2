"""`/ws/workspaces/{ws}/channels/{ch}`: live delivery of a channel to one socket.

The socket authenticates within `ws_auth_timeout_s` with its first frame `{"token": ...}` (at
most `ws_first_frame_bytes`; a `?token=` query is still accepted, and masked in every log),
then receives one JSON frame per message, each with the `cursor` to resume after it: with
`?cursor=`, what came after that cursor first, in write order (`?after=<id>`: best effort, see
`dualwrite.live`). Every message reaches the socket at least once, in write order; clients drop
repeated ids. Notices of the workspace ("saved", "channels") come as frames of their own.
Closes: 1013 too slow (resume with `?cursor=` the last cursor received: nothing before it was
dropped), 4410 the cursor is older than the realtime tier keeps (reload history, then connect
without a cursor), 4422 a malformed cursor or id, 4401 when the token expires (the page renews
it before then).

Caps, per process: sockets still waiting for their token (in all, and per client address:
refused with HTTP 403), live sockets per user and in all (closed with 1008); and connects per
user a second, shared through the realtime tier (1008).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.websockets import WebSocket, WebSocketDisconnect

from dualwrite import metrics
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.live import Overflowed, Subscription
from dualwrite.model import ChannelRef, LiveEntry
from dualwrite.server.auth import Identity, Unauthorized
from dualwrite.server.live import encode
from dualwrite.server.ratelimit import Limit
from dualwrite.server.state import server_state
from dualwrite.server.wsprotocol import SEND_TEXT_NOW
from dualwrite.validation import check_channel, check_id

log = logging.getLogger(__name__)

_NOTICES_WAITING = 100


class _Refused(Exception):
    """Close the socket with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


async def live(websocket: WebSocket) -> None:
    state = server_state(websocket)
    settings, counts = state.settings, state.sockets
    address = websocket.client.host if websocket.client else "unknown"
    if (
        counts.unauthenticated >= settings.ws_max_unauthenticated
        or counts.unauthenticated_by_address[address] >= settings.ws_max_unauthenticated_per_address
    ):
        # Refused before the handshake completes: the client gets an HTTP 403.
        await websocket.close(1008, reason="too many sockets waiting to sign in")
        return
    counts.waiting(address)
    # Past the accept the handshake's headers and query are gone (`LeanWebSocketProtocol` lets
    # them go): `websocket.headers`, `.cookies`, `.url` and `.query_params` read empty.
    query = _query(websocket)
    try:
        await websocket.accept()
        identity = await _identify(websocket, query.pop("token", None))
    except _Refused as refused:
        await _close(websocket, refused.code, refused.reason)
        return
    except Unauthorized as error:
        await _close(websocket, 4401, str(error))
        return
    except WebSocketDisconnect:
        return
    finally:
        counts.done_waiting(address)
    try:
        channel = check_channel(websocket.path_params["ws"], websocket.path_params["ch"])
        after, cursor = query.get("after") or None, query.get("cursor") or None
        del query
        if after is not None:
            check_id("after", after)
        if cursor is not None and (len(cursor) > 100 or not cursor.isascii()):
            raise InvalidInput("cursor", "is not a cursor")
    except InvalidInput as error:
        await websocket.close(4422, reason=str(error)[:100])
        return
    if channel.workspace_id != identity.workspace_id:
        await websocket.close(4403, reason="forbidden: not your workspace")
        return
    user = f"{identity.workspace_id}/{identity.user.id}"
    if await state.limits.wait_s(state.dw, (Limit.CONNECT, user, 1)):
        await websocket.close(1008, reason="too many connects: slow down")
        return
    if counts.by_user[user] >= settings.ws_max_per_user or counts.live >= settings.ws_max_sockets:
        await websocket.close(1008, reason="too many sockets")
        return
    counts.join(user)
    metrics.WEBSOCKETS.inc()
    # Deliver until the client leaves, falls behind, or its token expires (4401).
    expiry = asyncio.timeout(
        None if identity.expires_at is None else identity.expires_at - time.time()
    )
    del identity  # not needed while the socket is open
    try:
        try:
            async with expiry:
                await _deliver(websocket, channel, cursor, after)
        except TimeoutError:
            if not expiry.expired():
                raise
            await websocket.close(4401, reason="token expired: renew it and reconnect")
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        metrics.WEBSOCKETS.dec()
        counts.leave(user)


class _Notices:
    """A socket's notices (best effort): while some wait, one short task sends them; a socket
    too slow for them drops those past `_NOTICES_WAITING` (history and the channel list say
    the same). An idle socket holds no queue and no task for them."""

    __slots__ = ("_send", "_task", "_waiting")

    def __init__(self, send: Callable[[str], Awaitable[None]]) -> None:
        self._send = send
        self._waiting: collections.deque[str] | None = None
        self._task: asyncio.Task[None] | None = None

    def take(self, frame: str) -> None:
        if self._waiting is None:
            self._waiting = collections.deque()
        if len(self._waiting) >= _NOTICES_WAITING:
            return
        self._waiting.append(frame)
        if self._task is None:
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await self._send(self._waiting.popleft())
        except Exception:
            # The client left or the socket is closing: its reader and sender see to that.
            self._waiting = None
        finally:
            self._task = None

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Messages:
    """A socket's messages: its backlog first, by a task; then each live write is written the
    moment the feed reads it, when the socket can take it at once (`SEND_TEXT_NOW`): no task
    and no future wait on an idle socket. When it cannot (a client not reading, or a server
    without that extension), the writes wait in the listener, in order, and a short task sends
    them until none is left."""

    __slots__ = ("_closed", "_end", "_send", "_send_now", "_subscription", "_task", "failure")

    def __init__(
        self,
        subscription: Subscription,
        send: Callable[[str], Awaitable[None]],
        send_now: Callable[[str], bool] | None,
        end: Callable[[], None],
    ) -> None:
        self._subscription = subscription
        self._send = send
        self._send_now = send_now
        self._end = end
        self._closed = False
        self.failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._sending(backlog=True))
        subscription.when_overflowed(self._overflowed)

    async def _sending(self, *, backlog: bool) -> None:
        try:
            if backlog:
                async for entry in self._subscription.backlog():
                    await self._send(encode(entry))
                self._subscription.push(self._offer)
            while entries := self._subscription.take_waiting():
                for entry in entries:
                    await self._send(encode(entry))
        except Exception as error:
            self._fail(error)
        finally:
            self._task = None

    def _offer(self, entry: LiveEntry) -> bool:
        # On the feed's turn: it must not raise, nor wait.
        if self._closed or self.failure is not None:
            return True  # the socket is being closed: the client resumes from its cursor
        if self._task is not None:
            return False  # the task sends what waits, this one after them
        if self._send_now is not None:
            try:
                if self._send_now(encode(entry)):
                    return True
            except Exception:  # the ASGI send meets it again and tells
                log.debug("live frame not written at once", exc_info=True)
        self._task = asyncio.create_task(self._sending(backlog=False))
        return False

    def _overflowed(self) -> None:
        # A client that stops reading blocks the task's send; this stops it.
        if self._task is not None:
            self._task.cancel()
        self._fail(Overflowed())

    def _fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error
        self._end()

    async def close(self) -> None:
        self._closed = True  # no task may start after this one is gone
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _deliver(
    websocket: WebSocket, channel: ChannelRef, cursor: str | None, after: str | None
) -> None:
    """Send messages and notices until the client leaves, falls too far behind, or cannot
    resume.

    Per socket, while it is open: this coroutine and a task reading what the client sends (so
    a close is noticed at once); messages and notices need tasks only while they wait for the
    client (thousands of sockets share a process).
    """
    state = server_state(websocket)
    failure: BaseException | None = None
    # Two producers share the socket: messages, and the workspace's notices.
    sending = asyncio.Lock()

    async def send(frame: str) -> None:
        async with sending:
            await websocket.send_text(frame)

    send_now = websocket.scope.get("extensions", {}).get(SEND_TEXT_NOW)
    notices = _Notices(send)
    try:
        async with (
            state.notices.watching(channel.workspace_id, channel.channel_id, notices.take),
            state.dw.live.listen(channel, cursor=cursor, after_id=after) as subscription,
        ):
            # Whichever ends first ends the socket: the client, or its messages (overflow, a
            # failed send, a backlog that cannot be read). One future, not `asyncio.wait`'s
            # set of callbacks: this waits as long as the socket is open.
            ended = asyncio.get_running_loop().create_future()

            def end(_: object = None) -> None:
                if not ended.done():
                    ended.set_result(None)

            reader = asyncio.create_task(_drain_client(websocket))
            reader.add_done_callback(end)
            messages = _Messages(subscription, send, send_now, end)
            try:
                await ended
            finally:
                # Also when cancelled (token expiry): no task may outlive the socket.
                reader.cancel()
                await asyncio.gather(
                    reader, messages.close(), notices.close(), return_exceptions=True
                )
            failure = messages.failure
    except Exception as error:  # the channel could not be watched (the tier is down)
        failure = error
    # The listener is released before a close that may wait for the client to read.
    if isinstance(failure, Overflowed):
        await websocket.close(1013, reason="too slow: reconnect with ?cursor=<last cursor>")
    elif isinstance(failure, CursorExpired):
        await websocket.close(4410, reason="cursor too old: reload history")
    elif isinstance(failure, InvalidInput):
        await websocket.close(4422, reason=str(failure)[:100])
    elif isinstance(failure, WebSocketDisconnect | RuntimeError):
        raise failure  # the client left
    elif failure is not None:
        log.warning("live delivery failed: channel=%s error=%r", channel, failure)
        await websocket.close(1011, reason="live delivery failed: reconnect with ?cursor=")


async def _identify(websocket: WebSocket, query_token: str | None) -> Identity:
    """The socket's identity, from `?token=` or its first frame, within the auth timeout."""
    state = server_state(websocket)
    try:
        async with asyncio.timeout(state.settings.ws_auth_timeout_s):
            token = query_token or await _first_frame_token(websocket)
            return await state.authenticator.identify(token)
    except TimeoutError:
        raise Unauthorized('send {"token": ...} as the first frame, at once') from None


def _query(websocket: WebSocket) -> dict[str, str]:
    """The query, parsed as `websocket.query_params` does, but not kept for the socket's
    lifetime (it holds the token, and thousands of sockets share a process)."""
    return dict(
        parse_qsl(websocket.scope["query_string"].decode("latin-1"), keep_blank_values=True)
    )


async def _first_frame_token(websocket: WebSocket) -> str:
    limit = server_state(websocket).settings.ws_first_frame_bytes
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise _Refused(1003, 'the first frame must be text: {"token": ...}')
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise _Refused(1009, f"the first frame is over {limit} bytes")
    try:
        first = json.loads(text)
    except (ValueError, RecursionError):
        raise Unauthorized('the first frame must be {"token": ...}') from None
    token = first.get("token") if isinstance(first, dict) else None
    if not isinstance(token, str) or not token:
        raise Unauthorized('the first frame must be {"token": ...}')
    return token


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    # A close reason is at most 123 bytes; keep it short and ASCII-safe.
    with contextlib.suppress(RuntimeError):  # the client may have gone already
        await websocket.close(code, reason=reason.encode("ascii", "replace")[:100].decode())


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so a close is noticed at once."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
