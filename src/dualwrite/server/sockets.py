"""`/ws/workspaces/{ws}/channels/{ch}`: live delivery of a channel to one socket.

The socket authenticates (a `?token=` or a first frame `{"token": ...}`), then receives one
JSON frame per message: with `?after=<id>`, what came after that id first. A socket too slow
for its buffer is closed with 1013 and resumes with `?after=` its last id.
"""

from __future__ import annotations

import asyncio
import json

from starlette.websockets import WebSocket, WebSocketDisconnect

from dualwrite import metrics
from dualwrite.errors import InvalidInput
from dualwrite.model import ChannelRef
from dualwrite.server.auth import Identity, Unauthorized
from dualwrite.server.live import Overflowed
from dualwrite.server.state import server_state
from dualwrite.validation import check_channel, check_id


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
    except InvalidInput as error:
        await websocket.close(4422, reason=str(error)[:100])
        return
    if channel.workspace_id != identity.workspace_id:
        await websocket.close(4403, reason="forbidden: not your workspace")
        return
    metrics.WEBSOCKETS.inc()
    try:
        await _deliver(websocket, channel, after)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        metrics.WEBSOCKETS.dec()


async def _deliver(websocket: WebSocket, channel: ChannelRef, after: str | None) -> None:
    """Forward frames until the client leaves or falls too far behind."""
    async with server_state(websocket).hub.listen(channel, after) as frames:

        async def forward() -> None:
            async for frame in frames:
                await websocket.send_text(frame)

        sender = asyncio.create_task(forward())
        reader = asyncio.create_task(_drain_client(websocket))
        done, pending = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if sender in done and isinstance(sender.exception(), Overflowed):
            await websocket.close(1013, reason="too slow: reconnect with ?after=<last id>")


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
