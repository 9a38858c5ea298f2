"""The live WebSocket of a real `dualwrite serve` on Redis + PostgreSQL, to its contract:
frames carry a cursor; `?cursor=` resumes in write order; 1013, 4410, 4422."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from dualwrite.backends import BackendContext, create_realtime_tier
from dualwrite.clock import SystemClock
from dualwrite.ids import PushIdGenerator
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, RealtimeMessage
from dualwrite.server.wsprotocol import LeanWebSocketProtocol
from dualwrite.settings import ServerSettings
from tests.conftest import realtime_url, store_url, unique
from tests.server.conftest import SECRET, Api, _api
from tests.server.test_processes import mint
from tests.support.servers import serve_process

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

BUFFER = 20


class Server:
    def __init__(self, base: str, realtime: str) -> None:
        self.base = base
        self.realtime = realtime
        self.workspace = unique("ws")
        self.token = mint("u1", "Ada", self.workspace)
        self.http = httpx.Client(
            base_url=base, headers={"authorization": f"Bearer {self.token}"}, timeout=10
        )

    def send(self, channel: str, text: str, client_id: str | None = None) -> str:
        body: dict[str, Any] = {"text": text}
        if client_id:
            body["clientMessageId"] = client_id
        answer = self.http.post(
            f"/api/workspaces/{self.workspace}/channels/{channel}/messages", json=body
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["messageId"])

    def write_directly(
        self, channel: str, count: int, text: str = "m", concurrently: bool = False
    ) -> list[RealtimeMessage]:
        """Write ``count`` messages straight into the realtime tier (faster than sending)."""
        ids, now = PushIdGenerator(), SystemClock().now_ms()
        messages = [
            RealtimeMessage(ids.new_id(), "u1", "Ada", f"{i} {text}", now, now + REALTIME_TTL_MS)
            for i in range(count)
        ]

        async def write() -> None:
            tier = create_realtime_tier(self.realtime, BackendContext())
            await tier.connect()
            ref = ChannelRef(self.workspace, channel)
            if concurrently:
                await asyncio.gather(*(tier.write(ref, m) for m in messages))
            for message in [] if concurrently else messages:
                await tier.write(ref, message)
            await tier.close()

        asyncio.run(write())
        return messages

    def url(self, channel: str, query: str = "") -> str:
        return self.base.replace("http", "ws") + (
            f"/ws/workspaces/{self.workspace}/channels/{channel}?token={self.token}{query}"
        )

    def socket(self, channel: str, query: str = "") -> ClientConnection:
        return connect(self.url(channel, query), open_timeout=10)


class StalledSocket:
    """A WebSocket client that reads nothing until told to, with a tiny receive buffer: the
    client of a frozen tab. (websockets' own clients keep reading into memory.)"""

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        uri = parse_uri(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((uri.host, uri.port))
        self.sock.settimeout(10)
        self.protocol.send_request(self.protocol.connect())
        self.sock.sendall(b"".join(self.protocol.data_to_send()))
        while not self.protocol.events_received():  # the handshake's response
            self.protocol.receive_data(self.sock.recv(65536))

    def read_until_closed(self) -> tuple[list[dict[str, Any]], int | None]:
        """Every frame until the server closes, and its close code."""
        received = []
        while True:
            data = self.sock.recv(65536)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    frame = json.loads(bytes(event.data))
                    if frame.get("type") == "message":  # notices are not this test's
                        received.append(frame)
            if self.protocol.close_code is not None or not data:
                self.sock.close()
                return received, self.protocol.close_code


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("sockets")
    realtime = realtime_url("redis", tmp_path)
    env = {
        "DUALWRITE_REALTIME_URL": realtime,
        "DUALWRITE_STORE_URL": store_url("postgres", tmp_path),
        "DUALWRITE_SEND_RATE_PER_S": "0",
        # One test user opens many sockets, quickly: limits meant for people are off.
        "DUALWRITE_SEND_BYTES_PER_S": "0",
        "DUALWRITE_CHANNEL_BYTES_PER_S": "0",
        "DUALWRITE_READ_RATE_PER_S": "0",
        "DUALWRITE_WS_MAX_PER_USER": "100000",
        "DUALWRITE_LIVE_BUFFER": str(BUFFER),
    }
    with serve_process(tmp_path, env=env) as base:
        yield Server(base, realtime)


def frames(socket: ClientConnection, count: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    """The next ``count`` message frames (notices, such as a channel's first use, skipped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        frame = json.loads(socket.recv(timeout_s))
        if frame.get("type") == "message":
            found.append(frame)
    return found


def settle(socket: ClientConnection) -> None:
    """Give the server time to watch the channel (a fresh socket has no cursor to resume)."""
    with pytest.raises(TimeoutError):
        socket.recv(0.5)


def test_every_socket_of_150_channels_gets_its_message(server: Server) -> None:
    """Case 1: beyond 100 watched channels a process delivered nothing to the rest."""
    with contextlib.ExitStack() as stack:
        sockets = {f"c{i}": stack.enter_context(server.socket(f"c{i}")) for i in range(150)}
        settle(sockets["c149"])
        sent = {channel: server.send(channel, f"to {channel}") for channel in sockets}
        got = {}
        for channel, socket in sockets.items():
            with contextlib.suppress(TimeoutError):
                got[channel] = frames(socket, 1, timeout_s=5)[0]
        assert {c: f["messageId"] for c, f in got.items()} == sent
        assert all(f["channelId"] == c and f["type"] == "message" for c, f in got.items())
        assert len({f["cursor"] for f in got.values()}) == len(sent)


def test_a_stalled_socket_is_closed_1013_and_resuming_from_its_cursor_loses_nothing(
    server: Server,
) -> None:
    """Case 2: an overflow used to drop the oldest buffered frame for good."""
    channel = unique("c")
    stalled = StalledSocket(server.url(channel))
    time.sleep(0.5)  # no cursor: let the server watch the channel first
    # 8 MB: more than the kernel's buffers hold (up to 4 MB here), then the server's buffer.
    sent = [m.message_id for m in server.write_directly(channel, 400, text="x" * 20_000)]
    received, code = stalled.read_until_closed()
    assert code == 1013
    assert 0 < len(received) < len(sent)
    with server.socket(channel, f"&cursor={received[-1]['cursor']}") as resumed:
        received += frames(resumed, len(sent) - len(received))
    assert [f["messageId"] for f in received] == sent


def test_a_retry_rewriting_an_older_id_reaches_a_socket_resuming_after_newer_ones(
    server: Server,
) -> None:
    """Case 3: a socket resuming after its newest id never got a rewritten older id."""
    channel = unique("c")
    with server.socket(channel) as socket:
        settle(socket)
        a = server.send(channel, "A", client_id="retry-a")
        b, c = server.send(channel, "B"), server.send(channel, "C")
        got = frames(socket, 3)
        assert [f["messageId"] for f in got] == [a, b, c]
    # "Retry?" after a lost answer: the same clientMessageId writes A again, after B and C.
    assert server.send(channel, "A", client_id="retry-a") == a
    with server.socket(channel, f"&cursor={got[-1]['cursor']}") as resumed:
        assert [f["messageId"] for f in frames(resumed, 1)] == [a]


def test_a_resume_replays_more_than_ten_thousand_messages(server: Server) -> None:
    """Case 5: replay stopped silently at 10,000 messages."""
    channel = unique("c")
    messages = server.write_directly(channel, 10_050, concurrently=True)
    with server.socket(channel, f"&after={messages[0].message_id}") as socket:
        got = [f["messageId"] for f in frames(socket, len(messages) - 1)]
        # Concurrent writes land in any order: each comes once, in the order it was written.
        assert sorted(got) == [m.message_id for m in messages[1:]]
        live = server.send(channel, "live")
        assert frames(socket, 1)[0]["messageId"] == live


def test_a_cursor_older_than_the_realtime_tier_keeps_closes_4410(server: Server) -> None:
    channel = unique("c")
    server.send(channel, "something")
    with server.socket(channel, "&cursor=1-0") as socket, pytest.raises(ConnectionClosed) as closed:
        while True:  # a notice (the channel's first use) may come before the close
            socket.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410


@pytest.mark.parametrize(
    "query", ["&cursor=nonsense", "&cursor=" + "1" * 200, "&after=a/b", "&after=caf%C3%A9"]
)
def test_a_malformed_cursor_closes_4422(server: Server, query: str) -> None:
    with server.socket(unique("c"), query) as socket, pytest.raises(ConnectionClosed) as closed:
        socket.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4422


def test_a_tier_that_fails_closes_1011_and_the_client_resumes_once_it_is_back(api: Api) -> None:
    url = f"{api.ws_base}/ws/workspaces/acme/channels/general?token={api.token()}"
    send = "/api/workspaces/acme/channels/general/messages"
    with connect(url) as socket:
        settle(socket)
        api.client.post(send, headers=api.auth(), json={"text": "first"})
        cursor = frames(socket, 1)[0]["cursor"]
    missed = api.client.post(send, headers=api.auth(), json={"text": "missed"}).json()
    api.realtime_faults.fail()
    with connect(f"{url}&cursor={cursor}") as socket, pytest.raises(ConnectionClosed) as closed:
        socket.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    api.realtime_faults.heal()
    with connect(f"{url}&cursor={cursor}") as socket:
        assert frames(socket, 1)[0]["messageId"] == missed["messageId"]


@pytest.fixture(
    params=[LeanWebSocketProtocol, "websockets-sansio"], ids=["serve's protocol", "uvicorn's"]
)
def any_protocol(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """A server in this process with `serve`'s WebSocket protocol (frames written at once) or
    uvicorn's own (every frame through the ASGI send)."""
    limits_off = ServerSettings(
        token_secret=SECRET, send_rate_per_s=0, send_bytes_per_s=0, channel_bytes_per_s=0
    )
    yield from _api(tmp_path, limits_off, ws=request.param)


def test_a_burst_of_messages_reaches_a_socket_in_write_order_and_so_does_the_next(
    any_protocol: Api,
) -> None:
    api = any_protocol
    path = "/api/workspaces/acme/channels/burst/messages"
    with connect(f"{api.ws_base}/ws/workspaces/acme/channels/burst?token={api.token()}") as ws:
        settle(ws)

        async def burst() -> list[str]:
            async with httpx.AsyncClient(base_url=str(api.client.base_url)) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(path, headers=api.auth(), json={"text": f"{i}"})
                        for i in range(40)
                    )
                )
            return [answer.json()["messageId"] for answer in answers]

        sent = asyncio.run(burst())
        got = frames(ws, len(sent))
        assert sorted(f["messageId"] for f in got) == sorted(sent)
        # The memory tier's cursors number its writes: `{incarnation}.{number}`.
        numbers = [int(f["cursor"].rpartition(".")[2]) for f in got]
        assert numbers == sorted(numbers)
        after = api.client.post(path, headers=api.auth(), json={"text": "after"}).json()
        assert frames(ws, 1)[0]["messageId"] == after["messageId"]
