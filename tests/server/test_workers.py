"""`dualwrite serve --workers N`: several processes behind one port, run as a user runs them.

Which worker holds a connection is read from /proc (tests/support/procs.py), not asked of the
server: each test opens connections until both workers have answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from websockets.sync.client import ClientConnection, connect

from dualwrite.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    build_parser,
    serve_settings,
)
from dualwrite.model import User
from dualwrite.server.auth import Identity, TokenSigner
from dualwrite.server.workers import WorkerApp, shared_secret, worker_config
from dualwrite.settings import ServerSettings
from dualwrite.tools.proxy import TcpProxy
from dualwrite.tools.serve_process import free_port
from tests.conftest import realtime_url, store_url, unique
from tests.support.procs import alive, serving_pid, workers
from tests.support.wait import until

SECRET = "workers-" + "w" * 40
START_S = 30.0


# Each `serve` flag: a value, and where the worker must find it.
SERVE_FLAGS: dict[str, tuple[list[str], str, dict[str, object]]] = {
    "--host": (["127.0.0.2"], "server", {"host": "127.0.0.2"}),
    "--port": (["8123"], "server", {"port": 8123}),
    "--workers": (["3"], "server", {"workers": 3}),
    "--allowed-host": (["a.example"], "server", {"allowed_hosts": "a.example"}),
    "--fault": (
        ["realtime=0.25,permanent=0.5"],
        "settings",
        {"fault_realtime": 0.25, "fault_permanent": 0.5},
    ),
    "--dev-sign-in": ([], "server", {"dev_sign_in": True}),
    "--firebase-project": (["proj"], "server", {"firebase_project": "proj"}),
    "--firebase-auth-emulator": ([], "server", {"firebase_auth_emulator": True}),
    "--metrics-host": (["127.0.0.3"], "server", {"metrics_host": "127.0.0.3"}),
    "--metrics-port": (["9999"], "server", {"metrics_port": 9999}),
    "--send-rate": (["2.5"], "server", {"send_rate_per_s": 2.5}),
    "--log-json": ([], "app", {"log_json": True}),
    "--realtime": (["redis://h:1/2"], "settings", {"realtime_url": "redis://h:1/2"}),
    "--store": (["sqlite:////s.db"], "settings", {"store_url": "sqlite:////s.db"}),
    "--queue": (["/q.db"], "settings", {"queue_path": "/q.db"}),
}


def test_every_serve_flag_and_variable_reaches_the_workers_as_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No flag is left out on the way to the workers: each is in what a worker unpickles
    (uvicorn's config, holding `WorkerApp`), and so is a variable no flag sets."""
    parser = build_parser()
    [serve] = [
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    options = {o for a in serve._actions for o in a.option_strings if o.startswith("--")}
    assert options - {"--help"} == set(SERVE_FLAGS), "a new flag: say where it must arrive"
    monkeypatch.setenv("DUALWRITE_MAX_TEXT_CHARS", "7")
    monkeypatch.setenv("DUALWRITE_WS_MAX_SOCKETS", "11")
    monkeypatch.setenv("DUALWRITE_WORKER_HEALTHCHECK_S", "12")
    argv = ["serve"] + [part for f, (v, _, _) in SERVE_FLAGS.items() for part in (f, *v)]
    args = parser.parse_args(argv)
    settings, server = serve_settings(args)
    app = WorkerApp(settings, shared_secret(server), args.log_json)
    shipped = pickle.loads(pickle.dumps(worker_config(app)))
    assert shipped.app == app and shipped.workers == 3 and shipped.factory
    assert shipped.timeout_worker_healthcheck == 12
    assert (shipped.host, shipped.port) == ("127.0.0.2", 8123)
    places = {"settings": shipped.app.settings, "server": shipped.app.server_settings}
    for flag, (_, where, expected) in SERVE_FLAGS.items():
        place = places.get(where, shipped.app)
        assert {name: getattr(place, name) for name in expected} == expected, flag
    assert shipped.app.settings.max_text_chars == 7
    assert shipped.app.server_settings.ws_max_sockets == 11
    assert shipped.app.server_settings.token_secret, "one secret, drawn by the parent"


def environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    """This environment without any DUALWRITE_* variable, then ``variables``; no limits that
    a test's burst of connections would hit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALWRITE_")}
    env.update(
        DUALWRITE_SEND_RATE_PER_S="0",
        DUALWRITE_READ_RATE_PER_S="0",
        DUALWRITE_SEND_BYTES_PER_S="0",
        DUALWRITE_CHANNEL_BYTES_PER_S="0",
        DUALWRITE_SIGN_IN_RATE_PER_S="0",
    )
    env.update(variables)
    return env


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serving(self, client_port: int) -> int:
        """The worker holding the connection from ``client_port``."""
        return serving_pid(self.process.pid, self.port, client_port)

    def answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited: {self.log.read_text()[-3000:]}")
        return False

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` to the parent alone; its exit code once it and its workers are done."""
        spawned = workers(self.process.pid)
        self.process.send_signal(signum)
        code = self.process.wait(20)
        assert not [pid for pid in spawned if alive(pid)], "every worker stopped with it"
        return code


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualwrite", *args]


def start(tmp_path: Path, env: dict[str, str], *args: str, workers: int = 2) -> Served:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command("serve", "--port", str(port), "--workers", str(workers), *args),
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Served(process, port, log)


def cleanup(served: Served) -> None:
    """Whatever happened to the test: nothing left running."""
    if served.process.poll() is not None:
        return
    spawned = workers(served.process.pid)
    served.process.terminate()
    try:
        served.process.wait(20)
    except subprocess.TimeoutExpired:
        for pid in [served.process.pid, *spawned]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        served.process.wait()


def wait_ready(served: Served) -> None:
    """Until both workers answer (the port answers once the first one does)."""
    deadline = time.monotonic() + START_S
    ready: set[int] = set()
    while len(ready) < 2:
        assert time.monotonic() < deadline, served.log.read_text()[-3000:]
        if served.answers():
            with httpx.Client(base_url=served.base, timeout=5) as client:
                ready.add(served.serving(client_port(client.get("/healthz"))))
        else:
            time.sleep(0.1)


@contextlib.contextmanager
def serving(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[Served]:
    served = start(tmp_path, env, *args)
    try:
        wait_ready(served)
        yield served
    finally:
        cleanup(served)


def by_both_workers(served: Served, call: Callable[[], int], each: int = 2) -> dict[int, int]:
    """Make ``call`` (which answers the pid that served it) until both workers have served it
    ``each`` times; how many each served."""
    served_by: dict[int, int] = defaultdict(int)
    # The kernel hands each connection to whichever worker accepts first; on a loaded machine
    # one can win 59 times in 60 (seen in CI), so this tries for long enough to see both.
    for _ in range(400):
        served_by[call()] += 1
        if len(served_by) == 2 and min(served_by.values()) >= each:
            return dict(served_by)
    raise AssertionError(f"connections did not reach two workers: {dict(served_by)}")


def client_port(response: httpx.Response) -> int:
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def mint(workspace: str, user: str = "u1") -> str:
    return TokenSigner(SECRET, ServerSettings()).mint(Identity(User(user, "Ada"), workspace))


def message_ids(ws: ClientConnection, wanted: set[str]) -> set[str]:
    """Read message frames (notices skipped) until every id of ``wanted`` came."""
    seen: set[str] = set()
    while not wanted <= seen:
        frame = json.loads(ws.recv(10))
        if frame.get("type") == "message":
            seen.add(frame["messageId"])
    return seen


@pytest.mark.redis
@pytest.mark.postgres
def test_two_workers_on_one_port_deliver_every_send_to_every_subscriber(tmp_path: Path) -> None:
    env = environment(
        tmp_path,
        DUALWRITE_TOKEN_SECRET=SECRET,
        DUALWRITE_REALTIME_URL=realtime_url("redis", tmp_path),
        DUALWRITE_STORE_URL=store_url("postgres", tmp_path),
        DUALWRITE_QUEUE_PATH=str(tmp_path / "queue.db"),
    )
    workspace = unique("ws")
    token = mint(workspace)
    auth = {"authorization": f"Bearer {token}"}
    path = f"/workspaces/{workspace}/channels/general"
    with serving(tmp_path, env) as served:
        first = httpx.post(f"{served.base}/api{path}/messages", headers=auth, json={"text": "0"})
        assert first.status_code == 201
        # Subscribers resume after the first message: they get every later one, whenever
        # their subscription starts.
        url = f"ws://127.0.0.1:{served.port}/ws{path}?after={first.json()['messageId']}"
        subscribers: list[ClientConnection] = []
        sockets = contextlib.ExitStack()

        def subscribe() -> int:
            ws = sockets.enter_context(connect(url))
            ws.send(json.dumps({"token": token}))
            subscribers.append(ws)
            return served.serving(ws.socket.getsockname()[1])

        sent: set[str] = set()

        def send() -> int:
            with httpx.Client(base_url=served.base, headers=auth, timeout=10) as client:
                answer = client.post(f"/api{path}/messages", json={"text": f"{len(sent)}"})
                assert answer.status_code == 201, answer.text
                sent.add(answer.json()["messageId"])
                return served.serving(client_port(answer))

        with sockets:
            subscribed = by_both_workers(served, subscribe)
            senders = by_both_workers(served, send)
            assert subscribed.keys() == senders.keys() == set(workers(served.process.pid))
            for ws in subscribers:
                assert message_ids(ws, sent) >= sent
        pids = list(senders)
        # Ctrl-C to the parent alone: it stops every worker, each shutting down cleanly.
        assert served.stop(signal.SIGINT) == EXIT_INTERRUPTED
    log = served.log.read_text()
    assert log.count("dualwrite: chat page at") == 1, "the startup lines, once"
    assert ", 2 worker processes)" in log
    for pid in pids:
        assert f"Finished server process [{pid}]" in log
    assert log.count("Application shutdown complete.") == 2
    assert "Traceback" not in log


@pytest.mark.redis
def test_every_worker_runs_on_the_flags_and_environment_the_parent_got(tmp_path: Path) -> None:
    """Flags (--realtime --store --queue --fault --dev-sign-in --allowed-host) and a variable
    (DUALWRITE_MAX_TEXT_CHARS) reach each worker; with no DUALWRITE_TOKEN_SECRET, the random
    secret is one for all (a token from one worker passes at the other)."""
    realtime = realtime_url("redis", tmp_path)
    store, queue = tmp_path / "flags-store.db", tmp_path / "flags-queue.db"
    env = environment(tmp_path, DUALWRITE_MAX_TEXT_CHARS="5")
    args = ["--realtime", realtime, "--store", f"sqlite:///{store}", "--queue", str(queue)]
    args += ["--fault", "permanent=1", "--dev-sign-in", "--allowed-host", "chat.example"]
    workspace = unique("ws")
    host = {"host": "chat.example"}
    tokens: list[str] = []
    pending: set[str] = set()
    channels: set[str] = set()
    with serving(tmp_path, env, *args) as served:

        def client() -> httpx.Client:
            return httpx.Client(base_url=served.base, headers=host, timeout=10)

        def sign_in() -> int:
            with client() as c:
                answer = c.post(
                    "/api/dev/token",
                    json={"userId": "u1", "userName": "Ada", "workspaceId": workspace},
                )
                assert answer.status_code == 200, answer.text
                tokens.append(answer.json()["token"])
                return served.serving(client_port(answer))

        def send_pending() -> int:
            with client() as c:
                answer = c.post(
                    f"/api/workspaces/{workspace}/channels/general/messages",
                    headers={"authorization": f"Bearer {tokens[len(pending) % len(tokens)]}"},
                    json={"text": "hi"},
                )
                assert answer.status_code == 202 and answer.json()["status"] == "pending"
                pending.add(answer.json()["messageId"])
                return served.serving(client_port(answer))

        def too_long() -> int:
            with client() as c:
                answer = c.post(
                    f"/api/workspaces/{workspace}/channels/general/messages",
                    headers={"authorization": f"Bearer {tokens[0]}"},
                    json={"text": "sixsix"},
                )
                assert answer.status_code == 413, answer.text
                return served.serving(client_port(answer))

        def create_channel() -> int:
            channel = f"c{len(channels)}"
            with client() as c:
                answer = c.post(
                    f"/api/workspaces/{workspace}/channels",
                    headers={"authorization": f"Bearer {tokens[0]}"},
                    json={"channelId": channel},
                )
                assert answer.status_code == 201, answer.text
                channels.add(channel)
                return served.serving(client_port(answer))

        def other_host() -> int:
            with httpx.Client(base_url=served.base, headers={"host": "evil.example"}) as c:
                answer = c.get("/healthz")
                assert answer.status_code == 400, "neither bound nor allowed"
                return served.serving(client_port(answer))

        def queue_view() -> int:
            with client() as c:
                answer = c.get("/api/queue", headers={"authorization": f"Bearer {tokens[0]}"})
                # The one queue file: every worker lists what both queued.
                assert {e["messageId"] for e in answer.json()["pending"]} == pending
                return served.serving(client_port(answer))

        for check in (sign_in, send_pending, too_long, create_channel, other_host, queue_view):
            by_both_workers(served, check)
        # `queue list` from a shell, beside the running workers, on the same file.
        listed = subprocess.run(
            command("queue", "list", "--queue", str(queue), "--realtime", realtime),
            env=environment(tmp_path, DUALWRITE_STORE_URL=f"sqlite:///{store}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert {line.split()[0] for line in listed.stdout.splitlines()[:-1]} == pending
    assert not (tmp_path / "dualwrite-data").exists(), "no worker fell back to the defaults"
    assert queued(queue) == pending
    with contextlib.closing(sqlite3.connect(store)) as db:
        rows = db.execute("SELECT channel_id FROM channels WHERE workspace_id = ?", (workspace,))
        assert {c for (c,) in rows} == {*channels, "general"}  # general: its messages'
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,), "all faulted"
    # Delivered to the realtime tier (under its prefix) by both workers, not saved.
    done = subprocess.run(
        command(
            "history",
            "--workspace",
            workspace,
            "--channel",
            "general",
            "--json",
            "--realtime",
            realtime,
            "--store",
            f"sqlite:///{store}",
        ),
        env=environment(tmp_path, DUALWRITE_QUEUE_PATH=str(queue)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    history = [json.loads(line) for line in done.stdout.splitlines()]
    assert {m["messageId"] for m in history} == pending
    assert not any(m["saved"] for m in history)


@pytest.mark.parametrize(
    ("args", "variables", "says"),
    [
        pytest.param(
            ["--workers", "2"],
            {},
            "dualwrite: --workers 2 needs a realtime tier that every process shares: "
            "memory:// lives inside one process",
            id="memory-tier",
        ),
        pytest.param(
            [],
            {"DUALWRITE_WORKERS": "3"},
            "dualwrite: --workers 3 needs a realtime tier that every process shares",
            id="memory-tier-env",
        ),
        pytest.param(
            ["--workers", "2", "--realtime", "redis://127.0.0.1:6379/0", "--store", "memory://"],
            {},
            "dualwrite: --workers 2 needs a permanent store that every process shares",
            id="memory-store",
        ),
        pytest.param(
            [
                "--workers",
                "2",
                "--realtime",
                "redis://127.0.0.1:6379/0",
                "--metrics-host",
                "0.0.0.0",
            ],
            {},
            "dualwrite: --workers 2 with --metrics-host: metrics are counted per process",
            id="metrics-host",
        ),
        pytest.param(
            ["--workers", "2", "--realtime", "redis://127.0.0.1:6379/0"],
            {"DUALWRITE_METRICS_TOKEN": "m" * 20},
            "dualwrite: --workers 2 with DUALWRITE_METRICS_TOKEN: metrics are counted per process",
            id="metrics-token",
        ),
        pytest.param(
            ["--workers", "0"],
            {},
            "dualwrite serve: error: argument --workers: '0' is not a number of processes",
            id="zero",
        ),
        pytest.param(
            [], {"DUALWRITE_WORKERS": "0"}, "dualwrite: DUALWRITE_WORKERS must be", id="zero-env"
        ),
    ],
)
def test_what_workers_cannot_share_is_refused_before_anything_starts(
    tmp_path: Path, args: list[str], variables: dict[str, str], says: str
) -> None:
    port = free_port()
    done = subprocess.run(
        command("serve", "--port", str(port), *args),
        env=environment(tmp_path, **variables),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith(says), done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written, no data folder made"
    assert free_port_is(port)


def free_port_is(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_workers_stop_when_their_supervisor_is_killed_outright(tmp_path: Path) -> None:
    env = environment(
        tmp_path,
        DUALWRITE_REALTIME_URL=realtime_url("redis", tmp_path),
        DUALWRITE_QUEUE_PATH=str(tmp_path / "queue.db"),
    )
    with serving(tmp_path, env) as served:
        spawned = workers(served.process.pid)
        assert len(spawned) == 2
        served.process.kill()  # SIGKILL, the OOM killer: it cannot stop them itself
        served.process.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in spawned):
            assert time.monotonic() < deadline, "workers went on without their supervisor"
            time.sleep(0.1)
        assert free_port_is(served.port), "the port is free for the next serve"


def test_workers_with_redis_down_do_not_start_and_say_why_in_one_line(tmp_path: Path) -> None:
    redis = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        command("serve", "--port", str(free_port()), "--workers", "2", "--realtime", redis),
        env=environment(tmp_path, DUALWRITE_REALTIME_TIMEOUT_S="0.5"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_UNAVAILABLE
    assert "Traceback" not in done.stderr and "Started parent process" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if "Redis" in x]
    assert line.startswith(f"dualwrite: cannot reach Redis at {redis} (")
    assert line.endswith("sends fail until it answers; the server did not start")


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def postgres_behind_a_proxy(tmp_path: Path) -> AsyncIterator[tuple[TcpProxy, str]]:
    url = store_url("postgres", tmp_path)
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        yield proxy, url
    finally:
        await proxy.cut()


def saved_counts(url: str, ids: set[str]) -> Callable[[], Awaitable[dict[str, int]]]:
    """A query of the store behind ``url``: how many rows each of ``ids`` has."""
    parts = urlsplit(url)
    [schema] = parse_qs(parts.query)["schema"]
    plain = urlunsplit(parts._replace(query=""))
    query = sql.SQL(
        "SELECT message_id, count(*) FROM {}.messages WHERE message_id = ANY(%s) "
        "GROUP BY message_id"
    ).format(sql.Identifier(schema))

    async def counts() -> dict[str, int]:
        await asyncio.sleep(0.2)  # a query every 0.2 s at most
        async with await psycopg.AsyncConnection.connect(plain, autocommit=True) as db:
            rows = await db.execute(query, (list(ids),))
            return {message_id: count for message_id, count in await rows.fetchall()}

    return counts


def queued(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {m for (m,) in db.execute("SELECT message_id FROM pending_writes")}


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_killed_workers_queued_writes_are_saved_once_the_store_is_back(
    tmp_path: Path,
) -> None:
    """PostgreSQL cut off: both workers answer "pending" and queue in the one queue file;
    a worker is killed (SIGKILL), perhaps holding a claim on entries; PostgreSQL back: every
    message is saved, once, and the queue is empty."""
    queue = tmp_path / "queue.db"
    async with postgres_behind_a_proxy(tmp_path) as (proxy, postgres):
        env = environment(
            tmp_path,
            DUALWRITE_TOKEN_SECRET=SECRET,
            DUALWRITE_REALTIME_URL=realtime_url("redis", tmp_path),
            DUALWRITE_STORE_URL=through(proxy, postgres),
            DUALWRITE_QUEUE_PATH=str(queue),
            DUALWRITE_PERMANENT_TIMEOUT_S="1",
            DUALWRITE_RETRY_BASE_S="0.05",
            DUALWRITE_RETRY_CAP_S="0.2",
            DUALWRITE_RETRY_POLL_S="0.05",
        )
        served = start(tmp_path, env)
        try:
            await asyncio.to_thread(wait_ready, served)
            await proxy.cut()
            workspace = unique("ws")
            auth = {"authorization": f"Bearer {mint(workspace)}"}
            sent: dict[str, int] = {}

            async def send() -> None:
                async with httpx.AsyncClient(base_url=served.base, timeout=15) as client:
                    answer = await client.post(
                        f"/api/workspaces/{workspace}/channels/general/messages",
                        headers=auth,
                        json={"text": f"while down {len(sent)}"},
                    )
                    assert answer.status_code == 202, answer.text
                    sent[answer.json()["messageId"]] = served.serving(client_port(answer))

            for _ in range(8):
                await asyncio.gather(*(send() for _ in range(4)))
                if len(set(sent.values())) == 2:
                    break
            assert len(set(sent.values())) == 2, "both workers took sends"
            assert queued(queue) == set(sent), "every pending send is in the one queue file"

            victim = next(iter(sent.values()))
            os.kill(victim, signal.SIGKILL)
            await until(lambda: asyncio.to_thread(lambda: not alive(victim)))
            await proxy.restore()

            counts = saved_counts(postgres, set(sent))

            async def all_saved() -> bool:
                return len(await counts()) == len(sent)

            await until(all_saved, 20)
            assert set((await counts()).values()) == {1}, "each saved once"

            async def queue_empty() -> bool:
                await asyncio.sleep(0.1)
                return not await asyncio.to_thread(queued, queue)

            await until(queue_empty)
            # The replacement is up (and both answer) before the server is stopped.
            await asyncio.to_thread(wait_ready, served)
            assert served.stop() == -signal.SIGTERM
        finally:
            await asyncio.to_thread(cleanup, served)
    log = served.log.read_text()
    assert f"Child process [{victim}] died" in log, "uvicorn's supervisor replaced it"
    assert "Traceback" not in log


@pytest.mark.redis
async def test_a_worker_that_cannot_start_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    """Redis answers the parent's check, then is cut off before the workers connect: they
    cannot start, and the server says so and stops (uvicorn's rule for a worker that never
    started), rather than running without them."""
    url = realtime_url("redis", tmp_path)
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    try:
        env = environment(
            tmp_path,
            DUALWRITE_TOKEN_SECRET=SECRET,
            DUALWRITE_REALTIME_URL=through(proxy, url),
            DUALWRITE_STORE_URL=f"sqlite:///{tmp_path}/messages.db",
            DUALWRITE_QUEUE_PATH=str(tmp_path / "queue.db"),
            # A worker that dies while its supervisor waits for its answer to a ping is seen
            # when the wait runs out.
            DUALWRITE_WORKER_HEALTHCHECK_S="3",
        )
        served = start(tmp_path, env)
        try:

            async def parent_started() -> bool:
                await asyncio.sleep(0.05)
                return "Started parent process" in served.log.read_text()

            await until(parent_started, START_S)
            await proxy.cut()

            async def exited() -> bool:
                await asyncio.sleep(0.1)
                return served.process.poll() is not None

            await until(exited, START_S)
        finally:
            await asyncio.to_thread(cleanup, served)
    finally:
        await proxy.cut()
    assert served.process.returncode == EXIT_FAILED
    log = served.log.read_text().splitlines()
    assert "failed to start, stopping the parent process" in "\n".join(log)
    assert log[-1] == (
        "dualwrite: a worker could not start (the log above says why); the server stopped"
    )
