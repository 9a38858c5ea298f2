"""The local Firebase stand-ins, started once per test session (README: Running on Firebase).

- `firebase-server` (npm): Realtime Database CRUD over REST ("firebase-server" kind);
- `rtdb_server.py` (ours): the documented REST queries, ETags and streaming ("firebase-rest");
- `@firestore-emulator/server` (npm, patched by patch_firestore_emulator.py): Firestore's gRPC API.
With `FIREBASE_DATABASE_EMULATOR_HOST` / `FIRESTORE_EMULATOR_HOST` already set (Google's
official emulators), those are used instead and nothing is started for them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dualwrite.tools.serve_process import free_port

HERE = Path(__file__).parent
NODE_MODULES = HERE / "node_modules"
NAMESPACE = "dualwrite-test"


@dataclass
class FirebaseServers:
    urls: dict[str, str] = field(default_factory=dict)
    rest_db: Any = None
    """The firebase-rest stand-in's Database (to drop its streams), when it runs here."""
    firestore_standin: bool = False
    """Firestore is the npm stand-in (no collection-group queries), not Google's emulator."""
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def realtime_url(self, kind: str) -> str:
        return self.urls[kind]


_servers: FirebaseServers | None = None


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {port} within 30 s")


def _start_node(stack: contextlib.ExitStack, name: str, args: list[str], port: int) -> None:
    process = subprocess.Popen(args, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()

    stack.callback(stop)
    _wait_for_port(port, process, name)


def firebase_servers() -> FirebaseServers:
    """Start the stand-ins on first use; skip the test if Firebase testing is not enabled."""
    global _servers
    if _servers is not None:
        return _servers
    official_rtdb = os.environ.get("FIREBASE_DATABASE_EMULATOR_HOST")
    official_firestore = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if not os.environ.get("DUALWRITE_TEST_FIREBASE") and not (official_rtdb or official_firestore):
        pytest.skip("DUALWRITE_TEST_FIREBASE is not set (scripts/test sets it)")
    if not (official_rtdb and official_firestore) and not NODE_MODULES.exists():
        pytest.fail("tests/firebase/node_modules is missing: run bash scripts/setup")
    servers = FirebaseServers()
    stack = servers.stack
    if official_rtdb:
        url = f"firebase-rtdb://{official_rtdb}?ns={NAMESPACE}"
        servers.urls = {"firebase-rest": url, "firebase-server": url}
    else:
        port = free_port()
        _start_node(
            stack,
            "firebase-server",
            [
                "node",
                str(NODE_MODULES / "firebase-server/bin/firebase-server.js"),
                "-p",
                str(port),
                "-a",
                "127.0.0.1",
                "-e",
            ],
            port,
        )
        servers.urls["firebase-server"] = f"firebase-rtdb://127.0.0.1:{port}?ns={NAMESPACE}"
        from tests.firebase.rtdb_server import create_app
        from tests.support.servers import serving

        app = create_app()
        servers.rest_db = app.state.db
        base = stack.enter_context(serving(app))
        servers.urls["firebase-rest"] = (
            f"firebase-rtdb://{base.removeprefix('http://')}?ns={NAMESPACE}"
        )
    if not official_firestore:
        port = free_port()
        _start_node(
            stack,
            "firestore emulator",
            [
                "node",
                "-e",
                f"new (require('@firestore-emulator/server').FirestoreServer)().start({port})",
            ],
            port,
        )
        os.environ["FIRESTORE_EMULATOR_HOST"] = f"127.0.0.1:{port}"
        servers.firestore_standin = True
    atexit.register(stack.close)
    _servers = servers
    return servers
