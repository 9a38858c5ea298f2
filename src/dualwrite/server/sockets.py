"""`/ws/workspaces/{ws}/channels/{ch}`: live delivery of a channel to one socket.

The socket authenticates (a `?token=` or a first frame `{"token": ...}`), then receives one
JSON frame per message, each with the `cursor` to resume after it: with `?cursor=`, what came
after that cursor first, in write order (`?after=<id>`: best effort, see `dualwrite.live`).
Every message reaches the socket at least once, in write order; clients drop repeated ids.
Closes: 1013 too slow (resume with `?cursor=` the last cursor received: nothing before it was
dropped), 4410 the cursor is older than the realtime tier keeps (reload history, then connect
without a cursor), 4422 a malformed cursor or id.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from dualwrite import metrics
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.live import Overflowed
from dualwrite.model import ChannelRef
from dualwrite.server.auth import Identity, Unauthorized
from dualwrite.server.live import encode
from dualwrite.server.state import server_state
from dualwrite.validation import check_channel, check_id

log = logging.getLogger(__name__)


async def live(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        identity = await _identify(websocket)
    except Unauthorized as error:
        await websocket.close(4401, reason=str(error)[:100])
        return
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
    metrics.WEBSOCKETS.inc()
    try:
        await _deliver(websocket, channel, cursor, after)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        metrics.WEBSOCKETS.dec()


async def _deliver(
    websocket: WebSocket, channel: ChannelRef, cursor: str | None, after: str | None
) -> None:
    """Forward frames until the client leaves, falls too far behind, or cannot resume."""
    hub = server_state(websocket).dw.live
    failure: BaseException | None = None
    try:
        async with hub.listen(channel, cursor=cursor, after_id=after) as subscription:

            async def forward() -> None:
                async for entry in subscription:
                    await websocket.send_text(encode(entry))

            sender = asyncio.create_task(forward())
            reader = asyncio.create_task(_drain_client(websocket))
            # A client that stops reading blocks `send_text`: its overflow is watched apart.
            stalled = asyncio.create_task(subscription.overflow.wait())
            tasks = {sender, reader, stalled}
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
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
    state = server_state(websocket)
    token = websocket.query_params.get("token")
    if not token:
        try:
            first = await asyncio.wait_for(
                websocket.receive_text(), state.settings.ws_auth_timeout_s
            )
            token = str(json.loads(first).get("token", ""))
        except (TimeoutError, ValueError, AttributeError, WebSocketDisconnect):
            raise Unauthorized('send {"token": ...} as the first frame') from None
    return await state.authenticator.identify(token)


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so a close is noticed at once."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
