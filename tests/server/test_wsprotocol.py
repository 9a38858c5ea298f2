"""`LeanWebSocketProtocol`: uvicorn's sans-I/O protocol with lighter per-socket state. Its
stand-ins must offer every call uvicorn makes on what they replace (checked on uvicorn's own
source, so an upgrade that calls something new fails here), and behave as the originals do for
one consumer. The protocol itself runs under every socket test of a real `serve`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from typing import Any

import pytest
from uvicorn.protocols.websockets import websockets_sansio_impl
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dualwrite.server.wsprotocol import LeanWebSocketProtocol, _Events, _Flag
from tests.support.servers import serving

SOURCE = inspect.getsource(websockets_sansio_impl)


@pytest.mark.parametrize(("attribute", "stand_in"), [("queue", _Events), ("writable", _Flag)])
def test_the_stand_ins_offer_every_call_uvicorn_makes(attribute: str, stand_in: type) -> None:
    called = set(re.findall(rf"self\.{attribute}\.(\w+)", SOURCE))
    assert called, f"uvicorn no longer uses self.{attribute}: revisit LeanWebSocketProtocol"
    missing = {name for name in called if not hasattr(stand_in, name)}
    assert not missing, f"uvicorn calls self.{attribute}.{missing}"


def test_the_handshake_attributes_it_lets_go_are_uvicorns() -> None:
    assert "self.request = event" in SOURCE
    assert "self.response = self.conn.accept(event)" in SOURCE
    # Read nowhere but while answering the handshake.
    assert "handshake_complete = True" in inspect.getsource(
        websockets_sansio_impl.WebSocketsSansIOProtocol.send
    )
    assert issubclass(LeanWebSocketProtocol, websockets_sansio_impl.WebSocketsSansIOProtocol)


async def test_events_come_out_in_order_and_wake_a_waiting_reader() -> None:
    events = _Events()
    assert events.empty()
    events.put_nowait(1)
    events.put_nowait(2)
    assert await events.get() == 1
    waiting = asyncio.create_task(events.get())
    assert await events.get() == 2
    await asyncio.sleep(0)
    assert not waiting.done()
    events.put_nowait(3)
    assert await waiting == 3
    assert events.empty()


async def test_a_cancelled_reader_leaves_the_events_usable() -> None:
    events = _Events()
    waiting = asyncio.create_task(events.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    events.put_nowait("after")
    assert await asyncio.wait_for(events.get(), 1) == "after"


async def test_the_flag_holds_writers_while_cleared() -> None:
    flag = _Flag()
    assert flag.is_set() and await flag.wait()
    flag.clear()
    writers = [asyncio.create_task(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in writers)
    flag.set()
    assert await asyncio.gather(*writers) == [True, True]
    flag.clear()
    cancelled = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    flag.set()
    assert await asyncio.wait_for(flag.wait(), 1)


def test_an_open_socket_keeps_none_of_its_handshakes_headers_or_query() -> None:
    """A browser's handshake headers are a few KB; thousands of open sockets share a process.
    The query may hold a `?token=`."""
    seen: dict[str, object] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        seen["before"] = (len(scope["headers"]), scope["query_string"])
        await send({"type": "websocket.accept"})
        protocol = receive.__self__
        # websockets' parser keeps the request it parsed in its generator's frame.
        request = protocol.conn.parser.gi_frame.f_locals.get("request")
        seen["after"] = (len(scope["headers"]), scope["query_string"])
        seen["request"] = None if request is None else (len(request.headers), request.path)
        await send({"type": "websocket.send", "text": "ok"})
        await receive()

    with (
        serving(app, ws=LeanWebSocketProtocol) as base,
        connect(
            base.replace("http://", "ws://") + "/live?token=secret",
            additional_headers={"x-big": "b" * 4000},
        ) as socket,
    ):
        assert socket.recv(5) == "ok"
    before: tuple[int, bytes] = seen["before"]  # type: ignore[assignment]
    assert before[0] and before[1] == b"token=secret"
    assert seen["after"] == (0, b"")
    assert seen["request"] in (None, (0, "/live"))


def test_a_text_frame_of_invalid_utf8_closes_1007_without_an_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate
    with serving(app, ws=LeanWebSocketProtocol) as base:
        uvicorn_log.addHandler(caplog.handler)
        try:
            with connect(base.replace("http://", "ws://") + "/") as socket:
                # A text frame (FIN, opcode 1, masked, 2 bytes) of bytes that are not UTF-8.
                socket.socket.sendall(bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]))
                with pytest.raises(ConnectionClosed):
                    socket.recv(5)
                assert socket.close_code == 1007
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
