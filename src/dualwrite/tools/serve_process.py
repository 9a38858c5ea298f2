"""`dualwrite serve` in a child process, for the bench's http target and the tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from dualwrite.errors import DualWriteError


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    env: Mapping[str, str], log_path: Path, *args: str, port: int | None = None
) -> Iterator[tuple[str, int]]:
    """Start `dualwrite serve`, wait until /healthz answers, yield (base URL, pid); then stop it."""
    port = port or free_port()
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dualwrite", "serve", "--port", str(port), *args],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise DualWriteError(f"serve did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
            yield base, process.pid
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
