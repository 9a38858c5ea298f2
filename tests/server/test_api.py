"""The HTTP API and WebSocket, through the ASGI app."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dualwrite.model import history_cursor
from tests.server.conftest import METRICS_TOKEN, SECRET, Api, next_message

MESSAGES = "/api/workspaces/acme/channels/general/messages"


def history(api: Api, **params: Any) -> list[dict[str, Any]]:
    response = api.client.get(MESSAGES, headers=api.auth(), params=params)
    assert response.status_code == 200
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def test_send_saved_is_201_and_shows_in_history(api: Api) -> None:
    response = api.client.post(MESSAGES, headers=api.auth(), json={"text": "hello"})
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "messageId": body["messageId"],
        "status": "saved",
        "timestamp": body["timestamp"],
    }
    [message] = history(api)
    assert message["messageId"] == body["messageId"]
    assert (message["text"], message["userName"], message["saved"]) == ("hello", "Ada", True)


def test_permanent_failure_is_202_with_the_warning_then_persist_saves_it(api: Api) -> None:
    api.store_faults.fail()
    response = api.client.post(MESSAGES, headers=api.auth(), json={"text": "later"})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "pending"
    assert body["warning"] == "Message sent but not saved. It will disappear in 1 hour."
    queue = api.client.get("/api/queue", headers=api.auth()).json()["pending"]
    assert [e["messageId"] for e in queue] == [body["messageId"]]
    assert api.client.get("/api/queue", headers=api.auth(user="u2")).json()["pending"] == []

    persist = f"{MESSAGES}/{body['messageId']}/persist"
    assert api.client.post(persist, headers=api.auth()).status_code == 202
    api.store_faults.heal()
    again = api.client.post(persist, headers=api.auth())
    assert again.status_code == 200 and again.json()["status"] == "saved"
    assert api.client.get("/api/queue", headers=api.auth()).json()["pending"] == []
    assert [m["saved"] for m in history(api)] == [True]


def test_realtime_failure_is_503_with_the_error_and_writes_nothing(api: Api) -> None:
    api.realtime_faults.fail(times=1)
    response = api.client.post(MESSAGES, headers=api.auth(), json={"text": "x"})
    assert response.status_code == 503
    assert response.json() == {"error": "Message failed to send. Retry?"}
    assert history(api) == []
    assert api.store_faults.calls["save"] == 0


def test_retrying_with_the_same_client_message_id_never_duplicates(api: Api) -> None:
    api.realtime_faults.operations = frozenset({"write"})
    api.realtime_faults.fail(times=1)
    body = {"text": "once", "clientMessageId": "c-42"}
    assert api.client.post(MESSAGES, headers=api.auth(), json=body).status_code == 503
    first = api.client.post(MESSAGES, headers=api.auth(), json=body)
    second = api.client.post(MESSAGES, headers=api.auth(), json=body)
    assert first.status_code == second.status_code == 201
    assert first.json()["messageId"] == second.json()["messageId"]
    assert [m["text"] for m in history(api)] == ["once"]
    # Another user may use the same key for their own message.
    other = api.client.post(MESSAGES, headers=api.auth(user="u2"), json=body)
    assert other.json()["messageId"] != first.json()["messageId"]
    reused = api.client.post(
        MESSAGES, headers=api.auth(), json={"text": "different", "clientMessageId": "c-42"}
    )
    assert reused.status_code == 422 and reused.json()["field"] == "clientMessageId"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"text": ""}, 422, "text"),
        ({"text": 5}, 422, "text"),
        ({}, 422, "text"),
        ({"text": "x" * 40_001}, 413, "text"),
        ({"text": "ok", "clientMessageId": "a/b"}, 422, "clientMessageId"),
        ({"text": "ok", "clientMessageId": 7}, 422, "clientMessageId"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(
    api: Api, body: dict[str, Any], status: int, field: str
) -> None:
    response = api.client.post(MESSAGES, headers=api.auth(), json=body)
    assert response.status_code == status
    assert response.json()["field"] == field
    assert history(api) == []


def test_bodies_that_are_not_json_objects_or_too_big_are_refused(api: Api) -> None:
    headers = {**api.auth(), "content-type": "application/json"}
    assert api.client.post(MESSAGES, headers=headers, content=b"{nope").status_code == 400
    assert api.client.post(MESSAGES, headers=headers, content=b"[1]").status_code == 400
    huge = b'{"text": "' + b"x" * 300_000 + b'"}'
    assert api.client.post(MESSAGES, headers=headers, content=huge).status_code == 413
    assert history(api) == []


def test_bad_channel_ids_are_422(api: Api) -> None:
    response = api.client.post(
        "/api/workspaces/acme/channels/a.b/messages", headers=api.auth(), json={"text": "x"}
    )
    assert response.status_code == 422 and response.json()["field"] == "channelId"


def test_history_pages_newest_first(api: Api) -> None:
    for i in range(5):
        api.client.post(MESSAGES, headers=api.auth(), json={"text": f"m{i}"})
    first = api.client.get(MESSAGES, headers=api.auth(), params={"limit": 3}).json()
    assert [m["text"] for m in first["messages"]] == ["m4", "m3", "m2"]
    rest = api.client.get(
        MESSAGES, headers=api.auth(), params={"limit": 3, "before": first["nextBefore"]}
    ).json()
    assert [m["text"] for m in rest["messages"]] == ["m1", "m0"]
    assert rest["nextBefore"] is None
    bad = api.client.get(MESSAGES, headers=api.auth(), params={"limit": "0"})
    assert bad.status_code == 422 and bad.json()["field"] == "limit"


def close_code(api: Api, path: str) -> int:
    with connect(api.ws_base + path) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def forged_tokens() -> list[str]:
    now = int(time.time())
    claims = {"sub": "u1", "name": "Ada", "workspaceId": "acme", "exp": now + 600}
    return [
        jwt.encode(claims, "another-secret-" + "y" * 40, algorithm="HS256"),
        jwt.encode({**claims, "exp": now - 10}, SECRET, algorithm="HS256"),
        jwt.encode(claims, None, algorithm="none"),  # type: ignore[arg-type]
        jwt.encode({"sub": "u1", "exp": now + 600}, SECRET, algorithm="HS256"),
        "not-a-token",
    ]


@pytest.mark.parametrize("token", forged_tokens())
def test_forged_expired_or_unsigned_tokens_get_401(api: Api, token: str) -> None:
    headers = {"authorization": f"Bearer {token}"}
    assert api.client.post(MESSAGES, headers=headers, json={"text": "x"}).status_code == 401
    assert close_code(api, f"/ws/workspaces/acme/channels/general?token={token}") == 4401
    assert history(api) == []


def test_a_token_that_worked_is_refused_once_it_expires(api: Api) -> None:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "u1", "name": "Ada", "workspaceId": "acme"}
    claims |= {"iss": "dualwrite", "aud": "dualwrite", "iat": now, "exp": now + 2}
    headers = {"authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}
    assert api.client.post(MESSAGES, headers=headers, json={"text": "x"}).status_code == 201
    time.sleep(2.2)
    assert api.client.post(MESSAGES, headers=headers, json={"text": "y"}).status_code == 401
    assert [m["text"] for m in history(api)] == ["x"]


def test_missing_token_gets_401(api: Api) -> None:
    assert api.client.post(MESSAGES, json={"text": "x"}).status_code == 401
    assert api.client.get("/api/queue").status_code == 401


def test_other_workspaces_are_403_over_http_and_websocket(api: Api) -> None:
    outsider = api.auth(workspace="globex")
    assert api.client.post(MESSAGES, headers=outsider, json={"text": "x"}).status_code == 403
    assert api.client.get(MESSAGES, headers=outsider).status_code == 403
    persist = f"{MESSAGES}/-abc/persist"
    assert api.client.post(persist, headers=outsider).status_code == 403
    token = api.token(workspace="globex")
    assert close_code(api, f"/ws/workspaces/acme/channels/general?token={token}") == 4403
    assert history(api) == []


def test_websocket_delivers_live_and_replays_after_the_last_id(api: Api) -> None:
    url = f"{api.ws_base}/ws/workspaces/acme/channels/general?token={api.token()}"
    with connect(url) as ws:
        time.sleep(0.1)
        sent = api.client.post(MESSAGES, headers=api.auth(), json={"text": "live"}).json()
        frame = next_message(ws, 5)
        assert frame["messageId"] == sent["messageId"]
        assert (frame["type"], frame["text"], frame["userName"]) == ("message", "live", "Ada")
        assert frame["ttl"] == frame["timestamp"] + 3_600_000
    missed = [
        api.client.post(MESSAGES, headers=api.auth(), json={"text": f"missed{i}"}).json()
        for i in range(3)
    ]
    with connect(f"{url}&after={sent['messageId']}") as ws:
        got = [next_message(ws, 5)["messageId"] for _ in missed]
        assert got == [m["messageId"] for m in missed]


def test_websocket_token_may_come_in_the_first_frame(api: Api) -> None:
    with connect(f"{api.ws_base}/ws/workspaces/acme/channels/general") as ws:
        ws.send(json.dumps({"token": api.token()}))
        time.sleep(0.1)
        sent = api.client.post(MESSAGES, headers=api.auth(), json={"text": "hi"}).json()
        assert next_message(ws, 5)["messageId"] == sent["messageId"]


def test_dev_sign_in_mints_a_working_token(api: Api) -> None:
    minted = api.client.post(
        "/api/dev/token", json={"userId": "u9", "userName": "Zed", "workspaceId": "acme"}
    )
    token = minted.json()["token"]
    response = api.client.post(
        MESSAGES, headers={"authorization": f"Bearer {token}"}, json={"text": "hey"}
    )
    assert response.status_code == 201
    bad = api.client.post(
        "/api/dev/token", json={"userId": "u#9", "userName": "Zed", "workspaceId": "acme"}
    )
    assert bad.status_code == 422 and bad.json()["field"] == "user.id"


def test_metrics_openapi_page_and_health(api: Api) -> None:
    api.client.post(MESSAGES, headers=api.auth(), json={"text": "count me"})
    assert api.client.get("/metrics").status_code == 401, "behind its bearer token"
    bearer = {"authorization": f"Bearer {METRICS_TOKEN}"}
    metrics = api.client.get("/metrics", headers=bearer).text
    for name in (
        "dualwrite_sends_total",
        "dualwrite_realtime_write_seconds_bucket",
        "dualwrite_permanent_write_seconds_bucket",
        "dualwrite_retry_queue_depth",
        "dualwrite_retries_total",
        "dualwrite_websocket_connections",
    ):
        assert name in metrics
    schema = api.client.get("/openapi.json").json()
    assert "/api/workspaces/{ws}/channels/{ch}/messages" in schema["paths"]
    page = api.client.get("/").text
    assert "Message failed to send. Retry?" in page
    assert "Message sent but not saved. It will disappear in 1 hour." in page
    assert api.client.get("/static/app.js").status_code == 200
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_a_user_sending_too_fast_gets_429_with_retry_after(slow_api: Api) -> None:
    # One send every 100 s, bursts of 2: the third send is refused however slow the machine.
    api = slow_api
    statuses = [
        api.client.post(MESSAGES, headers=api.auth(), json={"text": f"m{i}"}).status_code
        for i in range(2)
    ]
    assert statuses == [201, 201]  # the burst
    refused = api.client.post(MESSAGES, headers=api.auth(), json={"text": "more"})
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    # Others are not slowed by one user's burst.
    other = api.client.post(MESSAGES, headers=api.auth(user="u2"), json={"text": "hi"})
    assert other.status_code == 201
    assert "more" not in [m["text"] for m in history(api, limit=50)]


def test_history_with_the_store_down_is_503_not_a_crash(api: Api) -> None:
    api.client.post(MESSAGES, headers=api.auth(), json={"text": "hello"})
    api.store_faults.fail()
    response = api.client.get(MESSAGES, headers=api.auth())
    assert response.status_code == 503
    assert "unavailable" in response.json()["error"]
    # Sending still works: delivered, queued.
    assert api.client.post(MESSAGES, headers=api.auth(), json={"text": "x"}).status_code == 202


def test_a_first_frame_token_no_encoder_takes_is_a_4401_not_a_crash(api: Api) -> None:
    with connect(f"{api.ws_base}/ws/workspaces/acme/channels/general") as ws:
        ws.send('{"token": "\\ud800"}')  # a lone surrogate, escaped in the JSON
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_a_cursor_past_year_9999_is_refused_not_sent_to_the_store(api: Api) -> None:
    before = history_cursor(9_999_999_999_999_999, "-x")
    response = api.client.get(MESSAGES, params={"before": before}, headers=api.auth())
    assert response.status_code == 422
