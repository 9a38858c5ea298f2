from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dualwrite.backends import create_permanent_store, create_realtime_tier
from dualwrite.faults import Faults, FaultyPermanentStore, FaultyRealtimeTier
from dualwrite.model import User
from dualwrite.runtime import open_dualwrite
from dualwrite.server.app import create_app
from dualwrite.server.auth import Identity, TokenSigner
from dualwrite.server.wsprotocol import LeanWebSocketProtocol
from dualwrite.settings import ServerSettings, Settings
from tests.support.servers import serving

SECRET = "test-secret-" + "x" * 40
METRICS_TOKEN = "metrics-" + "m" * 24


@dataclass
class Api:
    client: httpx.Client
    ws_base: str
    realtime_faults: Faults
    store_faults: Faults
    signer: TokenSigner

    def token(self, user: str = "u1", name: str = "Ada", workspace: str = "acme") -> str:
        return self.signer.mint(Identity(User(user, name), workspace))

    def auth(self, **kw: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(**kw)}"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _api(
        tmp_path,
        ServerSettings(token_secret=SECRET, dev_sign_in=True, metrics_token=METRICS_TOKEN),
    )


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[Api]:
    """A server whose users may send once every 100 s, in bursts of two."""
    yield from _api(tmp_path, ServerSettings(token_secret=SECRET, send_rate_per_s=0.01))


@pytest.fixture
def firebase_auth_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """A server that also takes Firebase ID tokens, from the Auth emulator (unsigned)."""
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")
    config = ServerSettings(
        token_secret=SECRET, firebase_project="dualwrite-test", firebase_auth_emulator=True
    )
    yield from _api(tmp_path, config)


def _api(
    tmp_path: Path,
    config: ServerSettings,
    *,
    background: bool = False,
    port: int = 0,
    ws: Any = LeanWebSocketProtocol,
    **overrides: Any,
) -> Iterator[Api]:
    """A server in this process on fault-injecting backends, with `serve`'s WebSocket protocol
    (or ``ws``); ``overrides`` go to `Settings`."""
    realtime_faults, store_faults = Faults(), Faults()
    settings = Settings(
        store_url=f"sqlite:///{tmp_path}/messages.db",
        queue_path=str(tmp_path / "queue.db"),
        realtime_timeout_s=0.5,
        permanent_timeout_s=0.5,
        **overrides,
    )

    def open_runtime():  # type: ignore[no-untyped-def]
        return open_dualwrite(
            settings,
            realtime=FaultyRealtimeTier(create_realtime_tier("memory://"), realtime_faults),
            store=FaultyPermanentStore(create_permanent_store(settings.store_url), store_faults),
            background=background,
        )

    app = create_app(settings, config, open_runtime=open_runtime)
    with serving(app, port, ws=ws) as base, httpx.Client(base_url=base, timeout=10) as client:
        ws_base = base.replace("http://", "ws://")
        yield Api(client, ws_base, realtime_faults, store_faults, TokenSigner(SECRET, config))


def next_message(ws: Any, timeout_s: float = 10) -> dict[str, Any]:
    """The socket's next message frame, past notices ("saved", a channel's first use)."""
    while True:
        frame: dict[str, Any] = json.loads(ws.recv(timeout_s))
        if frame.get("type") == "message":
            return frame
