"""Issue 14, item by item: each attack of the security review, against a real `serve` process
over HTTP and WebSocket, gets the answer docs/security.md promises."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from dualwrite.model import User
from dualwrite.server.auth import Identity, TokenSigner
from dualwrite.settings import ServerSettings
from dualwrite.tools.serve_process import free_port
from tests.conftest import realtime_url, unique
from tests.server.conftest import next_message
from tests.support.sentry import fake_sentry
from tests.support.servers import TOKEN_SECRET, serve_process

CHANNEL = "/workspaces/acme/channels/general"
NO_SECRET: dict[str, str | None] = {"DUALWRITE_TOKEN_SECRET": None}


@dataclass
class Served:
    base: str
    log: Path

    @property
    def ws(self) -> str:
        return self.base.replace("http://", "ws://") + "/ws" + CHANNEL

    @property
    def messages(self) -> str:
        return f"{self.base}/api{CHANNEL}/messages"

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def served(
    tmp_path: Path, *args: str, env: Mapping[str, str | None] | None = None
) -> Iterator[Served]:
    port = free_port()
    with serve_process(tmp_path, *args, env=env, port=port) as base:
        yield Served(base, tmp_path / f"serve-{port}.log")


def refused_start(tmp_path: Path, *args: str, env: Mapping[str, str | None]) -> str:
    """Run `serve` expecting it to stop at once; return what it printed (a variable given as
    None is removed from its environment)."""
    environment = {
        **os.environ,
        "DUALWRITE_STORE_URL": f"sqlite:///{tmp_path}/messages.db",
        "DUALWRITE_QUEUE_PATH": str(tmp_path / "queue.db"),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "dualwrite", "serve", "--port", str(free_port()), *args],
        env={name: value for name, value in environment.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    return done.stdout + done.stderr


def token(user: str = "u1", name: str = "Ada", lifetime_s: int | None = None) -> str:
    signer = TokenSigner(TOKEN_SECRET, ServerSettings())
    return signer.mint(Identity(User(user, name), "acme"), lifetime_s)


def auth(user: str = "u1") -> dict[str, str]:
    return {"authorization": f"Bearer {token(user)}"}


def close_code(ws: ClientConnection, timeout_s: float = 10) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout_s)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


def first_frame_close(served: Served, frame: str | bytes) -> int:
    with connect(served.ws, max_size=None) as ws:
        with contextlib.suppress(ConnectionClosed):  # the server may close mid-frame
            ws.send(frame)
        return close_code(ws)


@contextlib.contextmanager
def live_socket(served: Served, user: str = "u1") -> Iterator[ClientConnection]:
    with connect(served.ws) as ws:
        ws.send(json.dumps({"token": token(user)}))
        yield ws


# 1. Open sign-in by default; any Host accepted (DNS rebinding).


def test_1_without_the_flag_nobody_signs_in_and_the_output_says_so(tmp_path: Path) -> None:
    with served(tmp_path, env=NO_SECRET) as server:
        minted = httpx.post(
            f"{server.base}/api/dev/token",
            json={"userId": "mallory", "userName": "Boss", "workspaceId": "acme"},
        )
        assert minted.status_code in (404, 405)
        assert "nobody can sign in" in server.output()


def test_1_dev_sign_in_is_announced_loopback_only_and_checks_the_host(tmp_path: Path) -> None:
    with served(tmp_path, "--dev-sign-in", env=NO_SECRET) as server:
        assert "DEVELOPMENT SIGN-IN IS ON" in server.output()
        minted = httpx.post(
            f"{server.base}/api/dev/token",
            json={"userId": "u1", "userName": "Ada", "workspaceId": "acme"},
        ).json()
        bearer = {"authorization": f"Bearer {minted['token']}"}
        assert httpx.post(server.messages, headers=bearer, json={"text": "hi"}).status_code == 201
        # A page on a rebound DNS name reaches 127.0.0.1 with its own name as Host.
        rebound = {"host": "attacker.example:8000"}
        assert httpx.get(server.base, headers=rebound).status_code == 400
        assert httpx.get(server.messages, headers={**bearer, **rebound}).status_code == 400
        upgrade = {
            **rebound,
            "connection": "Upgrade",
            "upgrade": "websocket",
            "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        assert httpx.get(f"{server.base}/ws{CHANNEL}", headers=upgrade).status_code == 403
        assert httpx.get(server.base, headers={"host": "localhost"}).status_code == 200
        # Loopback names only as themselves, not as the start of another name.
        for host in ("[::1]evil.example", "localhost:80:evil", "127.0.0.1 evil.example"):
            assert httpx.get(server.base, headers={"host": host}).status_code == 400, host
        assert httpx.get(server.base, headers={"host": "[::1]:8000"}).status_code == 200
    printed = refused_start(tmp_path, "--host", "0.0.0.0", "--dev-sign-in", env=NO_SECRET)
    assert "--dev-sign-in" in printed and "refused" in printed


def test_1_allowed_host_names_are_answered(tmp_path: Path) -> None:
    with served(tmp_path, "--allowed-host", "chat.example.com") as server:
        assert httpx.get(server.base, headers={"host": "chat.example.com"}).status_code == 200
        assert httpx.get(server.base, headers={"host": "other.example.com"}).status_code == 400


# 3 and 4. Tokens in logs and Sentry; message text and names in Sentry.


def test_3_4_no_token_text_or_name_in_the_log_or_sentry(tmp_path: Path) -> None:
    secret_token = token(name="Ada Secret-Name")
    text = "TOP-SECRET-TEXT"
    with (
        fake_sentry() as (dsn, envelopes),
        served(tmp_path, "--fault", "permanent=1.0", env={"SENTRY_DSN": dsn}) as server,
    ):
        with connect(f"{server.ws}?token={secret_token}") as ws:
            sent = httpx.post(
                f"{server.messages}?token={secret_token}",
                headers={"authorization": f"Bearer {secret_token}"},
                json={"text": text},
            )
            assert sent.status_code == 202  # saved nowhere permanent: reported to Sentry
            assert text in ws.recv(10)
        deadline = time.monotonic() + 20
        while not any("InjectedFault" in e for e in envelopes) and time.monotonic() < deadline:
            time.sleep(0.1)
        events = "\n".join(envelopes)
        assert "InjectedFault" in events
        log = server.output()
    assert "WebSocket" in log, "uvicorn logged the socket's request line"
    for leak in (secret_token, secret_token.split(".")[2], text, "Secret-Name"):
        assert leak not in log
        assert leak not in events


# 5. Unbounded memory tier; byte budgets per user and channel.


def test_5_a_full_memory_tier_fails_sends_and_keeps_what_it_holds(tmp_path: Path) -> None:
    with served(tmp_path, env={"DUALWRITE_MEMORY_MAX_BYTES": "20000"}) as server:
        answers = [
            httpx.post(server.messages, headers=auth(f"u{i}"), json={"text": f"{i}" * 4000})
            for i in range(6)
        ]
        statuses = [a.status_code for a in answers]
        assert statuses[:4] == [201] * 4 and statuses[-1] == 503
        assert answers[-1].json() == {"error": "Message failed to send. Retry?"}
        page = httpx.get(server.messages, headers=auth()).json()["messages"]
        assert len(page) == statuses.count(201)


def test_5_byte_budgets_per_user_and_per_channel(tmp_path: Path) -> None:
    env = {"DUALWRITE_SEND_BYTES_PER_S": "1000", "DUALWRITE_CHANNEL_BYTES_PER_S": "2000"}
    with served(tmp_path, env=env) as server:
        # Bursts of 8 s: 8,000 bytes a user, 16,000 a channel.
        big = {"text": "x" * 4000}
        user = [httpx.post(server.messages, headers=auth("u1"), json=big) for _ in range(3)]
        assert [r.status_code for r in user] == [201, 201, 429]
        assert int(user[-1].headers["retry-after"]) >= 1
        others = [httpx.post(server.messages, headers=auth(f"o{i}"), json=big) for i in range(3)]
        assert [r.status_code for r in others] == [201, 201, 429], "the channel's budget"


# 6. Unbounded sockets.


def test_6_sockets_are_capped_per_user_and_per_process(tmp_path: Path) -> None:
    env = {"DUALWRITE_WS_MAX_PER_USER": "2", "DUALWRITE_WS_MAX_SOCKETS": "3"}
    with served(tmp_path, env=env) as server, contextlib.ExitStack() as stack:
        held = [stack.enter_context(live_socket(server, "u1")) for _ in range(2)]
        time.sleep(0.3)
        with live_socket(server, "u1") as third:
            assert close_code(third) == 1008
        held.append(stack.enter_context(live_socket(server, "u2")))
        time.sleep(0.3)
        with live_socket(server, "u3") as over:
            assert close_code(over) == 1008
        sent = httpx.post(server.messages, headers=auth(), json={"text": "to all"}).json()
        for ws in held:
            assert next_message(ws)["messageId"] == sent["messageId"]


# 7. History costs the server more than the asker.


def test_7_history_pages_are_capped_in_bytes(tmp_path: Path) -> None:
    with served(tmp_path, env={"DUALWRITE_MAX_HISTORY_BYTES": "10000"}) as server:
        for i in range(5):
            sent = httpx.post(server.messages, headers=auth(), json={"text": f"{i}" * 3000})
            assert sent.status_code == 201
        first = httpx.get(server.messages, headers=auth(), params={"limit": 200}).json()
        assert [m["text"][0] for m in first["messages"]] == ["4", "3", "2"]
        rest = httpx.get(
            server.messages, headers=auth(), params={"before": first["nextBefore"]}
        ).json()
        assert [m["text"][0] for m in rest["messages"]] == ["1", "0"]


# 8. The Auth emulator variable alone opened the server to unsigned tokens.


def test_8_the_auth_emulator_needs_its_flag_and_is_announced(tmp_path: Path) -> None:
    env = {"FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099"}
    printed = refused_start(tmp_path, "--firebase-project", "p", env=env)
    assert "FIREBASE_AUTH_EMULATOR_HOST" in printed and "--firebase-auth-emulator" in printed
    unsigned = jwt.encode(
        {
            "iss": "https://securetoken.google.com/p",
            "aud": "p",
            "sub": "mallory",
            "iat": int(time.time()),
            "exp": int(time.time()) + 600,
            "workspaceId": "acme",
        },
        None,  # type: ignore[arg-type]
        algorithm="none",
    )
    headers = {"authorization": f"Bearer {unsigned}"}
    no_emulator = {"FIREBASE_AUTH_EMULATOR_HOST": ""}
    with served(tmp_path, "--firebase-project", "p", env=no_emulator) as server:
        assert httpx.post(server.messages, headers=headers, json={"text": "x"}).status_code == 401
    with served(tmp_path, "--firebase-project", "p", "--firebase-auth-emulator", env=env) as server:
        assert "FIREBASE AUTH EMULATOR" in server.output()


# 9. Rate limits on history, persist, connects, sign-in; shared by processes.


def test_9_history_persist_connects_and_sign_in_are_rate_limited(tmp_path: Path) -> None:
    env = {**NO_SECRET, "DUALWRITE_READ_RATE_PER_S": "0.01", "DUALWRITE_SIGN_IN_RATE_PER_S": "0.01"}
    with served(tmp_path, "--dev-sign-in", env=env) as server:
        body = {"userId": "u1", "userName": "Ada", "workspaceId": "acme"}
        signs = [httpx.post(f"{server.base}/api/dev/token", json=body) for _ in range(11)]
        assert [s.status_code for s in signs] == [200] * 10 + [429]
        bearer = {"authorization": f"Bearer {signs[0].json()['token']}"}
        reads = [httpx.get(server.messages, headers=bearer).status_code for _ in range(3)]
        assert reads == [200, 200, 429]
        persist = f"{server.messages}/-Nmissing0000000000/persist"
        persists = [httpx.post(persist, headers=bearer).status_code for _ in range(3)]
        assert persists == [404, 404, 429]
        codes = []
        for _ in range(3):
            with connect(server.ws) as ws:
                ws.send(json.dumps({"token": signs[0].json()["token"]}))
                with contextlib.suppress(TimeoutError):
                    codes.append(close_code(ws, timeout_s=1))
        assert codes == [1008], "the third connect is refused; the first two stay open"


@pytest.mark.redis
def test_9_the_send_limit_is_shared_by_processes_on_redis(tmp_path: Path) -> None:
    env = {"DUALWRITE_REALTIME_URL": realtime_url("redis", tmp_path)}
    user = unique("u")
    with (
        served(tmp_path, "--send-rate", "1", env=env) as first,
        served(tmp_path, "--send-rate", "1", env=env) as second,
    ):
        answers = [
            httpx.post(s.messages, headers=auth(user), json={"text": "hi"}).status_code
            for s in (first, second, first, second)
        ]
        assert answers[:2] == [201, 201] and answers[2:] == [429, 429]


# 10. Backend passwords in the startup output.


def test_10_backend_passwords_are_never_printed(tmp_path: Path) -> None:
    store = "postgresql://postgres:hunter2@127.0.0.1:1/test?sslpassword=hunter3&schema=x"
    with served(tmp_path, env={"DUALWRITE_STORE_URL": store}) as server:
        # The database is down: the send is pending, its error logged.
        sent = httpx.post(server.messages, headers=auth(), json={"text": "x"}, timeout=30)
        assert sent.status_code == 202
        printed = server.output()
    assert "chat page at" in printed and "***" in printed
    assert "hunter2" not in printed and "hunter3" not in printed


# 11 and 16. Hostile input: 4xx or a 4xxx/1003/1009 close, never a traceback.


def test_11_16_hostile_input_gets_4xx_or_a_close_without_traceback(tmp_path: Path) -> None:
    with served(tmp_path) as server:
        assert first_frame_close(server, b"\x00\xff binary") == 1003
        assert first_frame_close(server, "[" * 3000) == 4401
        assert first_frame_close(server, json.dumps({"token": ["x"]})) == 4401
        assert first_frame_close(server, "x" * 16 * 1024 * 1024) == 1009
        assert first_frame_close(server, json.dumps({"token": "x" * 5000})) == 1009
        with connect(server.ws) as silent:
            assert close_code(silent) == 4401, "no token within the auth timeout"
        nested = "[" * 100_000 + "]" * 100_000
        posted = httpx.post(
            server.messages,
            headers={**auth(), "content-type": "application/json"},
            content=nested[:200_000],
        )
        assert posted.status_code == 400
        for params in (
            {"limit": "²"},
            {"limit": "9" * 5000},
            {"before": "9" * 5000 + ":x"},
            {"before": "²:x"},
        ):
            assert httpx.get(server.messages, headers=auth(), params=params).status_code == 422
        output = server.output()
    assert "Traceback" not in output and "Exception in ASGI application" not in output


def test_16_a_refused_frame_is_answered_with_1009_and_a_sender_that_keeps_going_is_cut_off(
    tmp_path: Path,
) -> None:
    """The close frame reaches a client still sending (no reset that discards it), and a
    client that never stops sending is disconnected within seconds."""
    with served(tmp_path) as server:
        host, port = server.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                f"GET /ws{CHANNEL} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += raw.recv(4096)
            assert answer.startswith(b"HTTP/1.1 101")
            # A masked text frame announcing 16 MiB, then a trickle that never ends.
            raw.sendall(b"\x81\xff" + (16 << 20).to_bytes(8, "big") + b"mask")
            raw.setblocking(False)
            received, closed_by_server, started = b"", False, time.monotonic()
            while time.monotonic() - started < 15:
                try:
                    chunk = raw.recv(4096)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    closed_by_server = True
                    break
                received += chunk or b""
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    raw.send(b"x" * 1024)
                time.sleep(0.05)
    assert received[0] == 0x88, "the first frame is a close"
    assert int.from_bytes(received[2:4], "big") == 1009
    assert closed_by_server, "a client that kept sending still held its socket after 15 s"


def test_16_an_endless_header_is_cut_off_not_buffered(tmp_path: Path) -> None:
    with served(tmp_path) as server:
        host, port = server.base.removeprefix("http://").split(":")
        sent, answer = 0, b""
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < 64 * 1024 * 1024:
                    raw.sendall(b"a" * 65536)
                    sent += 65536
            with contextlib.suppress(ConnectionResetError):
                answer = raw.recv(4096)
        assert sent < 16 * 1024 * 1024, f"{sent:,} bytes of one header were taken in"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
        assert httpx.get(server.base + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "cap", ["DUALWRITE_WS_MAX_UNAUTHENTICATED", "DUALWRITE_WS_MAX_UNAUTHENTICATED_PER_ADDRESS"]
)
def test_16_sockets_waiting_for_their_token_are_capped(tmp_path: Path, cap: str) -> None:
    with served(tmp_path, env={cap: "2"}) as server:
        with connect(server.ws), connect(server.ws):
            time.sleep(0.3)
            with pytest.raises(InvalidStatus) as refused:
                connect(server.ws).close()
            assert refused.value.response.status_code == 403
        with live_socket(server) as ws:
            sent = httpx.post(server.messages, headers=auth(), json={"text": "hi"}).json()
            assert next_message(ws)["messageId"] == sent["messageId"]


def test_16_x_forwarded_for_does_not_get_around_the_per_address_cap(tmp_path: Path) -> None:
    # Loopback is the one peer uvicorn would take the header from, were it trusted.
    with served(tmp_path, env={"DUALWRITE_WS_MAX_UNAUTHENTICATED_PER_ADDRESS": "2"}) as server:
        spoofed = [{"X-Forwarded-For": f"203.0.113.{n}"} for n in range(3)]
        with (
            connect(server.ws, additional_headers=spoofed[0]),
            connect(server.ws, additional_headers=spoofed[1]),
        ):
            time.sleep(0.3)
            with pytest.raises(InvalidStatus) as refused:
                connect(server.ws, additional_headers=spoofed[2]).close()
            assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    ("headers", "status"),
    [(f"X-Long: {'a' * 9000}\r\n", b"431"), ("".join(f"X-{n}: a\r\n" for n in range(200)), b"431")],
)
def test_16_a_handshake_websockets_refuses_is_answered_and_closed(
    tmp_path: Path, headers: str, status: bytes
) -> None:
    with served(tmp_path) as server:
        host, port = server.base.removeprefix("http://").split(":")
        request = (
            f"GET /ws/workspaces/acme/channels/general HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(request.encode())
            answer = b""
            while chunk := raw.recv(65536):  # until the server closes (a timeout fails)
                answer += chunk
        assert answer.split(b" ")[1] == status, answer[:200]


# 12. Token lifetime, iss/aud, sockets outliving their token, renewal.


def test_12_token_lifetime_issuer_audience_expiry_and_renewal(tmp_path: Path) -> None:
    now = int(time.time())
    claims = {
        "sub": "u1",
        "name": "Ada",
        "workspaceId": "acme",
        "iss": "dualwrite",
        "aud": "dualwrite",
        "iat": now,
        "exp": now + 600,
    }
    refused = [
        {**claims, "exp": now + 100 * 365 * 86400},
        {**claims, "iat": now + 100 * 365 * 86400 - 600, "exp": now + 100 * 365 * 86400},
        {k: v for k, v in claims.items() if k != "iss"},
        {k: v for k, v in claims.items() if k != "aud"},
        {**claims, "aud": "another-service"},
        {**claims, "iss": "someone-else"},
    ]
    with served(tmp_path) as server:
        good = jwt.encode(claims, TOKEN_SECRET, algorithm="HS256")
        assert httpx.get(server.messages, headers=bearer(good)).status_code == 200
        for bad in refused:
            forged = jwt.encode(bad, TOKEN_SECRET, algorithm="HS256")
            assert httpx.get(server.messages, headers=bearer(forged)).status_code == 401
        short = token(lifetime_s=2)
        with connect(server.ws) as ws:
            ws.send(json.dumps({"token": short}))
            assert close_code(ws) == 4401, "closed when its token expires"
        renewed = httpx.post(f"{server.base}/api/auth/renew", headers=bearer(good))
        assert renewed.status_code == 200
        fresh = renewed.json()
        assert fresh["expiresAt"] <= (time.time() + 24 * 3600 + 5) * 1000
        assert httpx.get(server.messages, headers=bearer(fresh["token"])).status_code == 200


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


# 13. Security headers.


def test_13_every_answer_carries_the_security_headers(tmp_path: Path) -> None:
    with served(tmp_path) as server:
        for url in (server.base + "/", server.base + "/static/app.js", server.messages):
            headers = httpx.get(url).headers
            assert "default-src 'self'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert "unsafe-inline" not in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["x-frame-options"] == "DENY"


# 15. /metrics open to anyone.


def test_15_metrics_only_on_their_own_bind_or_behind_a_token(tmp_path: Path) -> None:
    port = free_port()
    with served(tmp_path, "--metrics-host", "127.0.0.1", "--metrics-port", str(port)) as server:
        assert httpx.get(f"{server.base}/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200 and "dualwrite_retry_queue_depth" in scraped.text
    metrics_token = "metrics-token-" + "q" * 20
    with served(tmp_path, env={"DUALWRITE_METRICS_TOKEN": metrics_token}) as server:
        assert httpx.get(f"{server.base}/metrics").status_code == 401
        assert httpx.get(f"{server.base}/metrics", headers=bearer("wrong")).status_code == 401
        assert httpx.get(f"{server.base}/metrics", headers=bearer(metrics_token)).status_code == 200


def test_1_dev_sign_in_refuses_any_host(tmp_path: Path) -> None:
    printed = refused_start(tmp_path, "--dev-sign-in", "--allowed-host", "*", env=NO_SECRET)
    assert "--allowed-host '*'" in printed and "DNS rebinding" in printed
