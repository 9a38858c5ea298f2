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
import contextlib
import json
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from dualwrite import metrics
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.live import Overflowed
from dualwrite.model import ChannelRef
from dualwrite.server.auth import Identity, Unauthorized
from dualwrite.server.live import encode
from dualwrite.server.ratelimit import Limit
from dualwrite.server.state import server_state
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
    try:
        await websocket.accept()
        identity = await _identify(websocket)
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
        after = websocket.query_params.get("after") or None
        if after is not None:
            check_id("after", after)
        cursor = websocket.query_params.get("cursor") or None
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
    try:
        await _deliver_until_expiry(websocket, channel, cursor, after, identity)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        metrics.WEBSOCKETS.dec()
        counts.leave(user)


async def _deliver_until_expiry(
    websocket: WebSocket,
    channel: ChannelRef,
    cursor: str | None,
    after: str | None,
    identity: Identity,
) -> None:
    """Deliver until the client leaves, falls behind, or its token expires (4401)."""
    delivery = asyncio.create_task(_deliver(websocket, channel, cursor, after))
    remaining = None if identity.expires_at is None else identity.expires_at - time.time()
    try:
        done, _ = await asyncio.wait({delivery}, timeout=remaining)
    finally:
        if not delivery.done():
            delivery.cancel()
            await asyncio.gather(delivery, return_exceptions=True)
    if delivery in done:
        delivery.result()
        return
    await websocket.close(4401, reason="token expired: renew it and reconnect")


async def _deliver(
    websocket: WebSocket, channel: ChannelRef, cursor: str | None, after: str | None
) -> None:
    """Forward frames until the client leaves, falls too far behind, or cannot resume."""
    state = server_state(websocket)
    failure: BaseException | None = None
    # Two producers share the socket: messages, and the workspace's notices (best effort: a
    # socket too slow for them drops some; history and the channel list say the same).
    notices: asyncio.Queue[str] = asyncio.Queue(_NOTICES_WAITING)
    sending = asyncio.Lock()

    def take_notice(frame: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            notices.put_nowait(frame)

    async def send(frame: str) -> None:
        async with sending:
            await websocket.send_text(frame)

    try:
        async with (
            state.notices.watching(channel.workspace_id, channel.channel_id, take_notice),
            state.dw.live.listen(channel, cursor=cursor, after_id=after) as subscription,
        ):

            async def forward() -> None:
                async for entry in subscription:
                    await send(encode(entry))

            async def forward_notices() -> None:
                while True:
                    await send(await notices.get())

            sender = asyncio.create_task(forward())
            reader = asyncio.create_task(_drain_client(websocket))
            # A client that stops reading blocks `send_text`: its overflow is watched apart.
            stalled = asyncio.create_task(subscription.overflow.wait())
            noticer = asyncio.create_task(forward_notices())
            tasks = {sender, reader, stalled, noticer}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also when cancelled (token expiry): no task may outlive the socket.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            failure = Overflowed() if stalled in done else None
            if sender in done and failure is None:
                failure = sender.exception()
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


async def _identify(websocket: WebSocket) -> Identity:
    """The socket's identity, from `?token=` or its first frame, within the auth timeout."""
    state = server_state(websocket)
    try:
        async with asyncio.timeout(state.settings.ws_auth_timeout_s):
            token = websocket.query_params.get("token") or await _first_frame_token(websocket)
            return await state.authenticator.identify(token)
    except TimeoutError:
        raise Unauthorized('send {"token": ...} as the first frame, at once') from None


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
