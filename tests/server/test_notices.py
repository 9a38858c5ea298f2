"""Live notices over the WebSocket: "saved" when a queued write lands, "channels" when one is
created; and the channel list of a workspace over HTTP."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from dualwrite import Settings, User, open_dualwrite
from dualwrite.backends import create_permanent_store
from dualwrite.faults import Faults, FaultyPermanentStore
from tests.conftest import realtime_url, store_url, unique
from tests.server.conftest import Api
from tests.server.test_processes import mint
from tests.support.servers import serve_process

GENERAL = "/api/workspaces/acme/channels/general/messages"


@contextlib.contextmanager
def socket(base: str, workspace: str, channel: str, token: str) -> Iterator[ClientConnection]:
    with connect(f"{base}/ws/workspaces/{workspace}/channels/{channel}") as ws:
        ws.send(json.dumps({"token": token}))
        time.sleep(0.2)  # let the server subscribe before anything is sent
        yield ws


def next_frame(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of that type (others, such as messages, are skipped)."""
    while True:
        frame: dict[str, Any] = json.loads(ws.recv(10))
        if frame["type"] == kind:
            return frame


def test_a_manual_retry_that_lands_tells_the_channels_sockets(api: Api) -> None:
    with socket(api.ws_base, "acme", "general", api.token()) as ws:
        api.store_faults.operations = frozenset({"save"})
        api.store_faults.fail()
        sent = api.client.post(GENERAL, headers=api.auth(), json={"text": "late"}).json()
        assert sent["status"] == "pending"
        api.store_faults.heal()
        persisted = api.client.post(f"{GENERAL}/{sent['messageId']}/persist", headers=api.auth())
        assert persisted.status_code == 200
        assert next_frame(ws, "saved") == {
            "type": "saved",
            "messageId": sent["messageId"],
            "workspaceId": "acme",
            "channelId": "general",
        }


def test_channels_list_holds_created_and_used_channels_and_creation_is_announced(
    api: Api,
) -> None:
    url = "/api/workspaces/acme/channels"
    assert api.client.get(url, headers=api.auth()).json() == {"channels": []}
    api.client.post(GENERAL, headers=api.auth(), json={"text": "hi"})
    with socket(api.ws_base, "acme", "general", api.token(user="u2", name="Bob")) as bob:
        created = api.client.post(url, headers=api.auth(), json={"channelId": "design"})
        assert created.status_code == 201
        assert next_frame(bob, "channels") == {
            "type": "channels",
            "workspaceId": "acme",
            "added": ["design"],
        }
    assert api.client.get(url, headers=api.auth()).json() == {"channels": ["design", "general"]}
    # Again: a success that changes nothing.
    assert api.client.post(url, headers=api.auth(), json={"channelId": "design"}).status_code == 201
    assert api.client.get(url, headers=api.auth()).json() == {"channels": ["design", "general"]}


@pytest.mark.parametrize("body", [{"channelId": ""}, {"channelId": "a/b"}, {"channelId": 3}, {}])
def test_bad_channel_names_are_422(api: Api, body: dict[str, Any]) -> None:
    response = api.client.post("/api/workspaces/acme/channels", headers=api.auth(), json=body)
    assert response.status_code == 422
    assert response.json()["field"] == "channelId"


def test_another_workspaces_channels_are_403(api: Api) -> None:
    url = "/api/workspaces/other/channels"
    assert api.client.get(url, headers=api.auth()).status_code == 403
    created = api.client.post(url, headers=api.auth(), json={"channelId": "x"})
    assert created.status_code == 403


def test_channels_with_the_store_down_are_503(api: Api) -> None:
    api.store_faults.hang()
    response = api.client.get("/api/workspaces/acme/channels", headers=api.auth())
    assert response.status_code == 503


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_retrier_in_another_process_tells_this_servers_sockets(tmp_path: Path) -> None:
    """The saved notice travels through the realtime tier: the server's socket hears a write
    that another process (here, a library user's retrier) saved late."""
    env = {
        "DUALWRITE_REALTIME_URL": realtime_url("redis", tmp_path),
        "DUALWRITE_STORE_URL": store_url("postgres", tmp_path),
    }
    workspace = unique("ws")
    token = mint("u1", "Ada", workspace)
    with (
        serve_process(tmp_path, env=env) as base,
        socket(base.replace("http", "ws"), workspace, "general", token) as ws,
    ):
        await late_save_elsewhere(workspace, env, tmp_path, ws)


async def late_save_elsewhere(
    workspace: str, env: dict[str, str], tmp_path: Path, ws: ClientConnection
) -> None:
    faults = Faults()
    settings = Settings(
        realtime_url=env["DUALWRITE_REALTIME_URL"],
        store_url=env["DUALWRITE_STORE_URL"],
        queue_path=str(tmp_path / "other-queue.db"),
    )
    store = FaultyPermanentStore(create_permanent_store(settings.store_url), faults)
    async with open_dualwrite(settings, store=store, background=False) as dw:
        faults.fail()
        sent = await dw.send_message(workspace, "general", "late", User("u1", "Ada"))
        assert sent.status == "pending"
        faults.heal()
        report = await dw.retry_all()
        assert report.saved == [sent.message_id]
    assert next_frame(ws, "saved")["messageId"] == sent.message_id


def test_a_channel_first_used_by_a_message_joins_the_list_and_is_announced(api: Api) -> None:
    with socket(api.ws_base, "acme", "general", api.token(user="u2", name="Bob")) as bob:
        sent = api.client.post(
            "/api/workspaces/acme/channels/fresh/messages", headers=api.auth(), json={"text": "hi"}
        )
        assert sent.status_code == 201
        assert next_frame(bob, "channels")["added"] == ["fresh"]
    listed = api.client.get("/api/workspaces/acme/channels", headers=api.auth()).json()
    assert listed == {"channels": ["fresh"]}
