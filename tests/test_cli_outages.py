"""The `dualwrite` command when Redis or PostgreSQL cannot be reached, run as a user runs it
(a process): one line saying what is down and what happens, and the README's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dualwrite.cli import EXIT_UNAVAILABLE
from dualwrite.model import User
from dualwrite.server.auth import Identity, TokenSigner
from dualwrite.settings import ServerSettings
from dualwrite.tools.serve_process import free_port, serve_process
from tests.support.servers import silent_port

SEND = ["send", "--workspace", "acme", "--channel", "general", "--user-id", "u1"]
SEND += ["--user-name", "Ada"]
SECRET = "s" * 40


def environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALWRITE_")}
    env.update(
        DUALWRITE_STORE_URL=f"sqlite:///{tmp_path}/messages.db",
        DUALWRITE_QUEUE_PATH=str(tmp_path / "queue.db"),
        DUALWRITE_REALTIME_TIMEOUT_S="0.5",
        DUALWRITE_PERMANENT_TIMEOUT_S="1",
    )
    env.update(variables)
    return env


def dualwrite(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dualwrite", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def refused_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_send_with_redis_refusing_is_one_line_and_exit_3(tmp_path: Path) -> None:
    url = refused_redis()
    done = dualwrite(environment(tmp_path, DUALWRITE_REALTIME_URL=url), *SEND, "hi")
    assert done.returncode == EXIT_UNAVAILABLE == 3
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"dualwrite: cannot reach Redis at {url} (")
    assert line.endswith("sends fail until it answers")


def test_send_with_redis_hanging_is_one_line_and_exit_3(tmp_path: Path) -> None:
    with silent_port() as port:
        url = f"redis://127.0.0.1:{port}/0"
        done = dualwrite(environment(tmp_path, DUALWRITE_REALTIME_URL=url), *SEND, "hi")
    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    assert f"cannot reach Redis at {url} (TimeoutError" in line


def test_serve_with_redis_refusing_does_not_start_and_says_why(tmp_path: Path) -> None:
    env = environment(tmp_path, DUALWRITE_REALTIME_URL=refused_redis())
    done = dualwrite(env, "serve", "--port", str(free_port()))
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if "Redis" in x]
    assert line.endswith("sends fail until it answers; the server did not start")


def refused_postgres() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/test?schema=dualwrite"


def test_send_with_postgres_refusing_is_queued_and_says_so(tmp_path: Path) -> None:
    done = dualwrite(environment(tmp_path, DUALWRITE_STORE_URL=refused_postgres()), *SEND, "hi")
    assert done.returncode == 0
    message_id, status = done.stdout.split()
    assert status == "pending"
    lines = done.stderr.splitlines()
    assert len(lines) == 4, done.stderr
    assert "cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:" in lines[0]
    assert "Connection refused" in lines[0]
    assert lines[0].endswith("sends are queued until it answers")
    assert "delivered live to no one" in lines[1]  # memory://, and no serve runs
    assert lines[2] == "dualwrite: Message sent but not saved. It will disappear in 1 hour."
    assert "it waits in the retry queue" in lines[3]
    listed = dualwrite(environment(tmp_path), "queue", "list")
    assert message_id in listed.stdout, "the message waits in the queue"


def test_history_with_postgres_hanging_is_exit_3_after_one_wait_not_two(tmp_path: Path) -> None:
    with silent_port() as port:
        url = f"postgresql://postgres@127.0.0.1:{port}/test"
        env = environment(tmp_path, DUALWRITE_STORE_URL=url, DUALWRITE_PERMANENT_TIMEOUT_S="3")
        done = dualwrite(env, "history", "--workspace", "acme", "--channel", "general")
    assert done.returncode == 3 and done.stdout == ""
    first, last = done.stderr.splitlines()
    assert first.endswith("sends are queued until it answers")
    # The connection check at start waited out the bound; the read that follows is told at
    # once that the database is down (it used to wait the bound again, for a pool connection).
    assert last.startswith(f"dualwrite: cannot reach PostgreSQL at {url} (ConnectionTimeout")
    assert "PoolTimeout" not in last


def test_migrate_with_postgres_refusing_is_exit_3(tmp_path: Path) -> None:
    done = dualwrite(environment(tmp_path, DUALWRITE_STORE_URL=refused_postgres()), "migrate")
    assert done.returncode == 3 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "cannot reach PostgreSQL" in line and "Connection refused" in line


def test_serve_with_postgres_refusing_starts_queues_sends_and_stays_quiet(
    tmp_path: Path,
) -> None:
    env = environment(
        tmp_path,
        DUALWRITE_STORE_URL=refused_postgres(),
        DUALWRITE_TOKEN_SECRET=SECRET,
        DUALWRITE_RETRY_BASE_S="0.05",
        DUALWRITE_RETRY_CAP_S="0.1",
        DUALWRITE_RETRY_POLL_S="0.05",
        DUALWRITE_RECONCILE_INTERVAL_S="0.1",
        DUALWRITE_RECONCILE_GRACE_S="0.01",
    )
    log = tmp_path / "serve.log"
    token = TokenSigner(SECRET, ServerSettings()).mint(Identity(User("u1", "Ada"), "acme"))
    with serve_process(env, log) as (base, _):
        headers = {"authorization": f"Bearer {token}"}
        for text in ("one", "two", "three"):
            answer = httpx.post(
                f"{base}/api/workspaces/acme/channels/general/messages",
                json={"text": text},
                headers=headers,
                timeout=10,
            )
            assert answer.status_code == 202 and answer.json()["status"] == "pending"
        queued = httpx.get(f"{base}/api/queue", headers=headers, timeout=10).json()
        assert len(queued["pending"]) == 3
    lines = log.read_text().splitlines()
    assert "Traceback" not in log.read_text()
    assert not [x for x in lines if "psycopg" in x], "no driver warnings"
    assert lines[0].endswith("sends are queued until it answers")
    # Each send is reported (the log and Sentry); besides them, the many failed retry and
    # reconcile rounds are said once each (reminders come every 300 s).
    warnings = [x for x in lines if " WARNING " in x and "permanent write failed" not in x]
    assert len([x for x in warnings if "retry of queued writes failed" in x]) == 1
    assert len([x for x in warnings if "reconcile round failed" in x]) == 1
    assert len(warnings) == 3, warnings  # those two, and the database at start


@pytest.mark.parametrize("command", [["inspect", "-NoSuchMessageId1234"], ["history"]])
def test_other_commands_with_redis_refusing_are_exit_3(tmp_path: Path, command: list[str]) -> None:
    if command == ["history"]:
        command = [*command, "--workspace", "acme", "--channel", "general"]
    done = dualwrite(environment(tmp_path, DUALWRITE_REALTIME_URL=refused_redis()), *command)
    assert done.returncode == 3
    assert len(done.stderr.splitlines()) == 1 and "cannot reach Redis" in done.stderr
