"""`dualwrite chaos`: sends over HTTP through two `serve` processes sharing Redis and PostgreSQL
while real faults are injected, then checks that nothing acknowledged was lost or duplicated.

Faults, in order, while messages flow: Redis paused (CLIENT PAUSE), Redis killed and restarted,
PostgreSQL connections terminated, PostgreSQL cut off (a TCP proxy refuses and drops
connections), one `serve` process killed with SIGKILL while its retry queue holds what
PostgreSQL refused and restarted on that queue, then PostgreSQL restored while the messages it
refused are repeated (same `clientMessageId`) well after their first attempt, then PostgreSQL
black-holed (connections open, nothing answered) and healed.
Redis here is a private `redis-server` with an fsync-always append-only file, as a production
Redis keeping idempotency keys would be; PostgreSQL is the one given, in a fresh schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dualwrite.tools.proxy import TcpProxy
from dualwrite.tools.serve_process import free_port

TOKEN_SECRET_BYTES = 48


@dataclass
class ChaosReport:
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    misdated: int = 0
    queued_at_kill: int = 0
    left_in_queues: int = 0
    failed_but_saved: int = 0
    late_repeats: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.misdated or self.left_in_queues)

    def summary(self) -> str:
        return (
            f"sent={self.sent} acknowledged={self.acknowledged} failed={self.failed} "
            f"lost={self.lost} duplicated={self.duplicated} misdated={self.misdated} "
            f"left_in_queues={self.left_in_queues} failed_but_saved={self.failed_but_saved} "
            f"queued_at_kill={self.queued_at_kill} late_repeats={self.late_repeats}"
        )


async def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"chaos: {what} within {timeout_s} s")
        await asyncio.sleep(0.1)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class _Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await _wait_for(lambda: _answers(self.port), 20, "redis-server did not start")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def command(self, *args: str) -> None:
        await asyncio.to_thread(
            subprocess.run,
            ["redis-cli", "-p", str(self.port), *args],
            check=True,
            capture_output=True,
        )


class _Server:
    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {**env, "DUALWRITE_QUEUE_PATH": str(workdir / f"queue-{name}.db")}
        self.queue_path = Path(self.env["DUALWRITE_QUEUE_PATH"])
        self.log = workdir / f"serve-{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("a") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "dualwrite", "serve", "--port", str(self.port)),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        await _wait_for(lambda: _answers(self.port), 30, f"serve {self.name} did not start")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                await self.kill()

    def queued(self) -> int:
        if not self.queue_path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(self.queue_path)) as db:
            try:
                return int(db.execute("SELECT count(*) FROM pending_writes").fetchone()[0])
            except sqlite3.OperationalError:
                return 0


@contextlib.asynccontextmanager
async def _environment(postgres_url: str, workdir: Path) -> AsyncIterator[dict[str, Any]]:
    run = uuid.uuid4().hex[:8]
    schema = f"chaos_{run}"
    app_name = f"dualwrite-chaos-{run}"
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    store = urlunsplit(
        parts._replace(
            netloc=netloc, query=f"schema={schema}&migrate=1&application_name={app_name}"
        )
    )
    redis = _Redis(workdir)
    await redis.start()
    secret = os.urandom(TOKEN_SECRET_BYTES).hex()
    env = {
        **os.environ,
        "DUALWRITE_TOKEN_SECRET": secret,
        "DUALWRITE_REALTIME_URL": f"redis://127.0.0.1:{redis.port}/0",
        "DUALWRITE_STORE_URL": store,
        "DUALWRITE_REALTIME_TIMEOUT_S": "1.0",
        "DUALWRITE_PERMANENT_TIMEOUT_S": "1.0",
        "DUALWRITE_RETRY_BASE_S": "0.2",
        "DUALWRITE_RETRY_CAP_S": "2",
        "DUALWRITE_RETRY_POLL_S": "0.2",
        "DUALWRITE_RECONCILE_INTERVAL_S": "2",
        "DUALWRITE_RECONCILE_GRACE_S": "3",
        # One chaos user sends everything: its limits are off.
        "DUALWRITE_SEND_RATE_PER_S": "0",
        "DUALWRITE_SEND_BYTES_PER_S": "0",
        "DUALWRITE_CHANNEL_BYTES_PER_S": "0",
        "DUALWRITE_READ_RATE_PER_S": "0",
    }
    servers = [_Server("a", env, workdir), _Server("b", env, workdir)]
    try:
        for server in servers:
            await server.start()
        yield {
            "proxy": proxy,
            "redis": redis,
            "servers": servers,
            "secret": secret,
            "schema": schema,
            "app_name": app_name,
            "postgres_url": postgres_url,
        }
    finally:
        for server in servers:
            await server.stop()
        await redis.kill()
        await proxy.cut()
        import psycopg

        with contextlib.suppress(Exception):
            async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as c:
                await c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _faults(
    env: dict[str, Any],
    spacing_s: float,
    report: ChaosReport,
    repeat_late: Callable[[], Awaitable[int]],
) -> None:
    import psycopg

    redis: _Redis = env["redis"]
    proxy: TcpProxy = env["proxy"]
    server_a: _Server = env["servers"][0]

    async def step(name: str) -> None:
        report.faults.append(name)
        await asyncio.sleep(spacing_s)

    await asyncio.sleep(spacing_s)
    await redis.command("CLIENT", "PAUSE", str(int(spacing_s * 1000)), "WRITE")
    await step("redis paused")
    await redis.kill()
    await step("redis killed")
    await redis.start()
    await step("redis restarted")
    async with await psycopg.AsyncConnection.connect(env["postgres_url"], autocommit=True) as c:
        await c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (env["app_name"],),
        )
    await step("postgresql connections terminated")
    await proxy.cut()
    await step("postgresql cut off")
    # Killed while its queue holds the writes PostgreSQL could not take.
    report.queued_at_kill = server_a.queued()
    await server_a.kill()
    await step("serve a killed (SIGKILL)")
    await server_a.start()
    await step("serve a restarted")
    await proxy.restore()
    report.late_repeats = await repeat_late()
    await step("postgresql restored; pending messages repeated well after their first attempt")
    proxy.black_hole()
    await step("postgresql black-holed")
    proxy.flow()
    await step("postgresql answers again")


async def run_chaos(
    postgres_url: str,
    *,
    messages: int,
    concurrency: int = 8,
    spacing_s: float = 1.5,
    progress: Callable[[str], None] = lambda line: None,
) -> ChaosReport:
    """Run the scenario; returns the counts (``report.ok`` is the verdict)."""
    import aiohttp
    import psycopg

    from dualwrite.model import User
    from dualwrite.server.auth import Identity, TokenSigner
    from dualwrite.settings import ServerSettings

    report = ChaosReport(sent=messages)
    with tempfile.TemporaryDirectory(prefix="dualwrite-chaos-") as scratch:
        async with _environment(postgres_url, Path(scratch)) as env:
            servers: list[_Server] = env["servers"]
            token = TokenSigner(env["secret"], ServerSettings()).mint(
                Identity(User("chaos", "Chaos"), "chaos")
            )
            headers = {"authorization": f"Bearer {token}"}
            acked: dict[int, tuple[str, int]] = {}
            pending_since: dict[int, float] = {}  # answered "pending" (202), at this time
            failed: set[int] = set()
            duration = spacing_s * 13
            interval = duration / max(messages, 1)
            started = time.monotonic()
            next_index = 0
            async with aiohttp.ClientSession(headers=headers) as session:

                async def send(index: int) -> None:
                    body = {"text": f"chaos {index}", "clientMessageId": f"c{index}"}
                    for attempt in range(12):
                        server = servers[(index + attempt) % 2]
                        url = f"{server.base}/api/workspaces/chaos/channels/general/messages"
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with session.post(
                                url, json=body, timeout=aiohttp.ClientTimeout(total=5)
                            ) as response:
                                if response.status in (201, 202):
                                    answer = await response.json()
                                    if (
                                        acked.setdefault(index, (answer["messageId"], 0))[0]
                                        != (answer["messageId"])
                                    ):
                                        report.duplicated += 1  # a repeat got another id
                                    acked[index] = (answer["messageId"], answer["timestamp"])
                                    if response.status == 202:
                                        pending_since.setdefault(index, time.monotonic())
                                    return
                        await asyncio.sleep(0.3)  # the user presses "Retry?" again
                    failed.add(index)

                async def repeat_late() -> int:
                    """Press "Retry?" on messages answered "pending" over 5 s ago, as their
                    store comes back: the repeat may be what saves them, and must keep the
                    first attempt's time."""
                    if pending_since:  # wait until the oldest "pending" is well over 5 s old
                        oldest = min(pending_since.values())
                        await asyncio.sleep(max(0.0, oldest + 5.5 - time.monotonic()))
                    late = [i for i, at in pending_since.items() if time.monotonic() - at > 5][:50]
                    await asyncio.gather(*(send(i) for i in late))
                    return len(late)

                faults = asyncio.create_task(_faults(env, spacing_s, report, repeat_late))

                async def sender() -> None:
                    nonlocal next_index
                    while next_index < messages:
                        index = next_index
                        next_index += 1
                        await asyncio.sleep(max(0.0, started + index * interval - time.monotonic()))
                        await send(index)
                        if len(acked) % max(1, messages // 10) == 0:
                            progress(f"chaos: {len(acked)}/{messages} acknowledged")

                await asyncio.gather(*(sender() for _ in range(concurrency)))
            await faults
            progress(f"chaos: faults done: {', '.join(report.faults)}; draining")
            await _wait_for(
                lambda: sum(s.queued() for s in servers) == 0, 90, "retry queues did not drain"
            )
            await asyncio.sleep(7)  # a reconcile round past the grace period
            report.left_in_queues = sum(s.queued() for s in servers)
            async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
                cursor = await conn.execute(
                    f'SELECT message_id, text, (extract(epoch FROM "timestamp") * 1000)::bigint '
                    f'FROM "{env["schema"]}".messages'
                )
                rows = await cursor.fetchall()
    by_text: dict[str, list[tuple[str, int]]] = {}
    for message_id, text, timestamp in rows:
        by_text.setdefault(text, []).append((message_id, int(timestamp)))
    report.acknowledged = len(acked)
    report.failed = len(failed)
    report.duplicated += sum(len(found) - 1 for found in by_text.values() if len(found) > 1)
    for index, (message_id, sent_at) in acked.items():
        found = by_text.get(f"chaos {index}", [])
        if [m for m, _ in found] != [message_id]:
            report.lost += 1
        elif abs(found[0][1] - sent_at) > 5_000:
            report.misdated += 1
    report.failed_but_saved = sum(1 for index in failed if f"chaos {index}" in by_text)
    return report


def describe(report: ChaosReport) -> str:
    return json.dumps({"ok": report.ok, **report.__dict__}, indent=2)
