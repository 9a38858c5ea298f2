"""A send on Firebase leaves exactly the story's data, as Firebase clients read it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from google.cloud import firestore

from dualwrite import Settings, User, open_dualwrite
from tests.conftest import realtime_url, store_url, unique
from tests.firebase.servers import HERE

pytestmark = pytest.mark.firebase


def rest_url(tier_url: str, path: str) -> str:
    parts = urlsplit(tier_url)
    return f"http://{parts.netloc}/{path}.json?{parts.query}"


@pytest.mark.parametrize("kind", ["firebase-rest", "firebase-server"])
async def test_realtime_and_firestore_records_are_the_storys(kind: str, tmp_path: Path) -> None:
    workspace, channel = unique("ws"), unique("ch")
    rt_url = realtime_url(kind, tmp_path)
    settings = Settings(
        realtime_url=rt_url,
        store_url=store_url("firestore", tmp_path),
        queue_path=str(tmp_path / "queue.db"),
    )
    async with open_dualwrite(settings, background=False) as dw:
        result = await dw.send_message(workspace, channel, "hello Firebase", User("u1", "Ada"))
    assert result.status == "saved"

    path = f"messages/{workspace}/{channel}/{result.message_id}"
    async with httpx.AsyncClient() as client:
        record = (await client.get(rest_url(rt_url, path))).json()
    assert record == {
        "userId": "u1",
        "userName": "Ada",
        "text": "hello Firebase",
        "timestamp": result.timestamp,
        "ttl": result.timestamp + 3_600_000,
    }
    assert isinstance(record["timestamp"], int) and isinstance(record["ttl"], int)

    if kind == "firebase-server":
        # The story's own client, the Firebase JS SDK, over its WebSocket protocol.
        database_url = f"http://{urlsplit(rt_url).netloc}?{urlsplit(rt_url).query}"
        read = await asyncio.to_thread(
            subprocess.run,
            ["node", str(HERE / "read_with_js_sdk.js"), database_url, path],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(read.stdout) == record

    document = (
        firestore.Client(project="dualwrite-test")
        .document(f"workspaces/{workspace}/channels/{channel}/messages/{result.message_id}")
        .get()
        .to_dict()
    )
    assert document is not None
    assert set(document) == {
        "messageId",
        "channelId",
        "workspaceId",
        "userId",
        "userName",
        "text",
        "timestamp",
        "createdAt",
    }
    assert (document["messageId"], document["channelId"], document["workspaceId"]) == (
        result.message_id,
        channel,
        workspace,
    )
    assert (document["userId"], document["userName"], document["text"]) == (
        "u1",
        "Ada",
        "hello Firebase",
    )
    # Firestore timestamps (server time), not numbers.
    assert isinstance(document["timestamp"], datetime)
    assert isinstance(document["createdAt"], datetime)
