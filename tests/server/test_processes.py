"""`dualwrite serve` as real processes: one on the embedded default, two sharing Redis (a
single node or a cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import realtime_url, store_url, unique
from tests.server.conftest import next_message
from tests.support.servers import TOKEN_SECRET, serve_process


def mint(user: str, name: str, workspace: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dualwrite",
            "token",
            "--user",
            user,
            "--name",
            name,
            "--workspace",
            workspace,
        ],
        env={**os.environ, "DUALWRITE_TOKEN_SECRET": TOKEN_SECRET},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_serve_on_the_embedded_default_sends_and_reads(tmp_path: Path) -> None:
    token = mint("u1", "Ada", "acme")
    headers = {"authorization": f"Bearer {token}"}
    with serve_process(tmp_path) as base:
        url = f"{base}/api/workspaces/acme/channels/general/messages"
        sent = httpx.post(url, headers=headers, json={"text": "over the wire"})
        assert sent.status_code == 201
        page = httpx.get(url, headers=headers).json()
        assert [m["text"] for m in page["messages"]] == ["over the wire"]
        assert "Message failed to send. Retry?" in httpx.get(base).text
    # The permanent store outlives the server.
    with serve_process(tmp_path) as base:
        page = httpx.get(
            f"{base}/api/workspaces/acme/channels/general/messages", headers=headers
        ).json()
        assert [m["text"] for m in page["messages"]] == ["over the wire"]


def test_dev_sign_in_is_off_when_a_secret_is_configured(tmp_path: Path) -> None:
    with serve_process(tmp_path) as base:
        minted = httpx.post(
            f"{base}/api/dev/token", json={"userId": "u", "userName": "U", "workspaceId": "w"}
        )
        assert minted.status_code in (404, 405)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "realtime_kind",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis_cluster),
    ],
)
def test_two_servers_sharing_redis_deliver_each_others_messages(
    tmp_path: Path, realtime_kind: str
) -> None:
    env = {
        "DUALWRITE_REALTIME_URL": realtime_url(realtime_kind, tmp_path),
        "DUALWRITE_STORE_URL": store_url("postgres", tmp_path),
    }
    workspace = unique("ws")
    token = mint("u1", "Ada", workspace)
    headers = {"authorization": f"Bearer {token}"}
    path = f"/workspaces/{workspace}/channels/general"
    with serve_process(tmp_path, env=env) as first, serve_process(tmp_path, env=env) as second:
        ws_url = first.replace("http", "ws") + f"/ws{path}?token={token}"
        with connect(ws_url) as ws:
            time.sleep(0.3)
            sent = httpx.post(
                f"{second}/api{path}/messages", headers=headers, json={"text": "across processes"}
            ).json()
            frame = next_message(ws)
            assert frame["messageId"] == sent["messageId"]
            assert frame["text"] == "across processes"
        # A client reconnecting to the other server with its last id gets what it missed.
        missed = httpx.post(
            f"{first}/api{path}/messages", headers=headers, json={"text": "while away"}
        ).json()
        after = f"{second.replace('http', 'ws')}/ws{path}?token={token}&after={sent['messageId']}"
        with connect(after) as ws:
            assert next_message(ws)["messageId"] == missed["messageId"]
