"""A CLI `send` on the embedded memory:// tier reaches the open page of a running `serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from dualwrite.tools.serve_process import serve_process
from tests.support.servers import silent_port

SEND = ["send", "--workspace", "acme", "--channel", "general", "--user-id", "u2"]
SEND += ["--user-name", "Grace"]


def environment(data: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALWRITE_")}
    env.update(
        DUALWRITE_STORE_URL=f"sqlite:///{data}/messages.db",
        DUALWRITE_QUEUE_PATH=str(data / "retry-queue.db"),
    )
    env.update(variables)
    return env


def dualwrite(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dualwrite", *args], env=env, capture_output=True, text=True
    )


def page_token(base: str) -> str:
    answer = httpx.post(
        f"{base}/api/dev/token",
        json={"userId": "u1", "userName": "Ada", "workspaceId": "acme"},
    )
    return str(answer.json()["token"])


@pytest.mark.parametrize("secret", [None, "cli-and-server-" + "k" * 32], ids=["dev", "secret"])
def test_a_cli_send_is_delivered_live_to_the_open_page(tmp_path: Path, secret: str | None) -> None:
    env = environment(tmp_path, **({"DUALWRITE_TOKEN_SECRET": secret} if secret else {}))
    with serve_process(env, tmp_path / "serve.log", "--dev-sign-in") as (base, _):
        assert (tmp_path / "serve.json").exists()
        ws_url = base.replace("http://", "ws://") + "/ws/workspaces/acme/channels/general"
        with connect(f"{ws_url}?token={page_token(base)}", open_timeout=10) as page:
            done = dualwrite(env, *SEND, "from a shell")
            assert done.returncode == 0, done.stderr
            message_id, status = done.stdout.split()
            assert status == "saved"
            assert f"sent through the serve at {base}: delivered live" in done.stderr
            frame = json.loads(page.recv(timeout=10))
        assert frame["messageId"] == message_id and frame["text"] == "from a shell"
        assert frame["userId"] == "u2" and frame["userName"] == "Grace"
        bad = dualwrite(env, *SEND, "   ")
        assert bad.returncode == 2 and "invalid input: text" in bad.stderr
    assert not (tmp_path / "serve.json").exists(), "a stopped serve takes its notice back"
    alone = dualwrite(env, *SEND, "nobody listens")
    assert alone.returncode == 0 and "delivered live to no one" in alone.stderr


def test_a_cli_without_the_servers_secret_is_told_which_it_needs(tmp_path: Path) -> None:
    server = environment(tmp_path, DUALWRITE_TOKEN_SECRET="server-" + "s" * 40)
    with serve_process(server, tmp_path / "serve.log"):  # a secret: no development sign-in
        for cli_secret in ({}, {"DUALWRITE_TOKEN_SECRET": "other-" + "o" * 40}):
            done = dualwrite(environment(tmp_path, **cli_secret), *SEND, "hi")
            assert done.returncode == 1 and done.stdout == ""
            assert "DUALWRITE_TOKEN_SECRET" in done.stderr


def test_a_stale_notice_of_a_dead_serve_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    notice = {"url": "http://127.0.0.1:9", "pid": int(dead.stdout), "store": ""}
    env = environment(tmp_path)
    notice["store"] = env["DUALWRITE_STORE_URL"]
    (tmp_path / "serve.json").write_text(json.dumps(notice))
    done = dualwrite(env, *SEND, "hi")
    assert done.returncode == 0 and done.stdout.split()[1] == "saved"
    assert "delivered live to no one" in done.stderr


def test_a_serve_that_does_not_answer_is_named(tmp_path: Path) -> None:
    with silent_port() as port:
        env = environment(tmp_path)
        notice = {"url": f"http://127.0.0.1:{port}", "pid": os.getpid()}
        notice["store"] = env["DUALWRITE_STORE_URL"]
        (tmp_path / "serve.json").write_text(json.dumps(notice))
        done = dualwrite(env, *SEND, "hi")
    assert done.returncode == 0 and done.stdout.split()[1] == "saved"
    said = f"the serve announced at http://127.0.0.1:{port} (pid {os.getpid()}) does not answer"
    assert f"{said}: delivered live to no one" in done.stderr


def test_a_notice_naming_another_host_is_ignored(tmp_path: Path) -> None:
    env = environment(tmp_path)
    notice = {"url": "http://192.0.2.1:8000", "pid": os.getpid(), "store": ""}
    notice["store"] = env["DUALWRITE_STORE_URL"]
    (tmp_path / "serve.json").write_text(json.dumps(notice))
    done = dualwrite(env, *SEND, "hi")
    assert done.returncode == 0 and "delivered live to no one" in done.stderr


def test_a_serve_on_other_data_is_not_used(tmp_path: Path) -> None:
    serve_data, cli_data = tmp_path / "serve", tmp_path / "cli"
    serve_data.mkdir()
    cli_data.mkdir()
    with serve_process(environment(serve_data), tmp_path / "serve.log"):
        # Same data directory, another store: sending through would save it elsewhere.
        env = environment(serve_data, DUALWRITE_STORE_URL=f"sqlite:///{cli_data}/messages.db")
        done = dualwrite(env, *SEND, "hi")
    assert done.returncode == 0 and "delivered live to no one" in done.stderr
