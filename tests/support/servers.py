"""Real `dualwrite serve` processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn

from dualwrite.tools.serve_process import free_port
from dualwrite.tools.serve_process import serve_process as spawn

TOKEN_SECRET = "e2e-secret-" + "z" * 40


@contextlib.contextmanager
def serve_process(
    data_dir: Path,
    *args: str,
    env: Mapping[str, str | None] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Start `dualwrite serve` in its own process; yield its base URL; stop it afterwards.

    A variable given as None in ``env`` is removed from the process's environment."""
    port = port or free_port()
    environment: dict[str, str | None] = {
        **os.environ,
        "DUALWRITE_TOKEN_SECRET": TOKEN_SECRET,
        "DUALWRITE_STORE_URL": f"sqlite:///{data_dir}/messages.db",
        "DUALWRITE_QUEUE_PATH": str(data_dir / f"queue-{port}.db"),
        **(env or {}),
    }
    present = {name: value for name, value in environment.items() if value is not None}
    with spawn(present, data_dir / f"serve-{port}.log", *args, port=port) as (base, _):
        yield base


@contextlib.contextmanager
def serving(app: Any, port: int = 0, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server (on ``port``, or a free one; ``config`` goes to
    `uvicorn.Config`), in a thread; yield its URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers: a hung dependency."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])
