"""The README's commands, run as written, so that the README cannot drift from the code.

The fenced shell block of "Running on Redis + PostgreSQL" runs as one bash script and every
command of the commands table runs after it, against the test services. Two things are
changed, and only these: the exported URLs point at the test services under a private Redis
prefix and PostgreSQL schema (the README must show a prefix and a schema for that), and `serve`
gets a free `--port`, is stopped with Ctrl-C (SIGINT) once it answers, and must exit cleanly.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dualwrite.backends.permanent.postgres import SCHEMA_VERSION
from dualwrite.cli import EXIT_INTERRUPTED
from dualwrite.tools.serve_process import free_port
from tests.conftest import _CREATED_SCHEMAS, unique

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

README = (Path(__file__).parents[1] / "README.md").read_text()


def section(title: str) -> str:
    """The text under a `## title` heading, up to the next heading."""
    start = README.index(f"\n## {title}\n")
    following = re.search(r"\n##+ ", README[start + 1 :])
    return README[start : start + 1 + following.start()] if following else README[start:]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def table_commands() -> list[str]:
    """Each command of the table under "Other commands", as written (placeholders and all)."""
    table = section("Set up and run (fresh machine: Python 3.11)").split("Other commands", 1)[1]
    commands = []
    for row in table.splitlines():
        if row.startswith("| `"):
            first_cell = row.split(" | ")[0]
            commands += re.findall(r"`([^`]+)`", first_cell)
    return commands


@dataclass
class Setup:
    workdir: Path
    env: dict[str, str]
    message_id: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """The "Running on Redis + PostgreSQL" block, run as a user runs it."""
    redis_url = os.environ.get("DUALWRITE_TEST_REDIS_URL")
    postgres_url = os.environ.get("DUALWRITE_TEST_POSTGRES_URL")
    if not redis_url or not postgres_url:
        pytest.skip("DUALWRITE_TEST_REDIS_URL and DUALWRITE_TEST_POSTGRES_URL are needed")
    workdir = tmp_path_factory.mktemp("readme")
    # `.venv/bin/dualwrite` as the README writes it, here: this interpreter's dualwrite.
    shim = workdir / ".venv" / "bin" / "dualwrite"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dualwrite "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)

    prefix, schema = unique("readme"), unique("readme_")
    _CREATED_SCHEMAS.append(schema)
    private = {
        "DUALWRITE_REALTIME_URL": f"{redis_url}?prefix={prefix}:",
        "DUALWRITE_STORE_URL": f"{postgres_url}?schema={schema}",
    }
    [block] = shell_blocks(section("Running on Redis + PostgreSQL"))
    script = ["set -euo pipefail", SERVE_BRIEFLY]
    port = free_port()
    for line in block.splitlines():
        exported = re.match(r"export (DUALWRITE_\w+)=(\S+)", line)
        if exported:
            name, value = exported.groups()
            written = shlex.split(value)[0]
            assert ("prefix=" if "REALTIME" in name else "schema=") in written, (
                f"the README's {name} shows no private prefix or schema: {written}"
            )
            line = f"export {name}={shlex.quote(private[name])}"
        elif re.match(r"\.venv/bin/dualwrite serve\b", line):
            command = line.split("#")[0].strip()
            line = f"serve_briefly {port} {command} --port {port}"
        script.append(line)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALWRITE_")}
    env["PYTHON"] = sys.executable
    env["DUALWRITE_TOKEN_SECRET"] = "readme-" + "r" * 40  # `token` needs one (the table)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert (
        lines[0] == f"migrated {private['DUALWRITE_STORE_URL']} to schema version {SCHEMA_VERSION}"
    )
    message_id, status = lines[1].split()
    assert status == "saved"
    assert lines[2] == f"{message_id}  Ada: hi"
    serve_log = (workdir / "serve.log").read_text()
    assert "chat page at" in serve_log and "Application shutdown complete" in serve_log
    try:
        yield Setup(workdir, {**env, **private}, message_id)
    finally:
        _delete_keys(redis_url, prefix)


# `serve PORT COMMAND...`: start it, wait until it answers, Ctrl-C it, expect a clean exit.
SERVE_BRIEFLY = f"""
serve_briefly() {{
    local port=$1; shift
    "$@" > serve.log 2>&1 &
    local pid=$!
    "$PYTHON" -c '
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{{sys.argv[1]}}/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
' "$port"
    kill -INT "$pid"
    local code=0
    wait "$pid" || code=$?
    # 130 as after a Ctrl-C in a terminal; 0 where the shell started it ignoring SIGINT (a
    # background job of a script), so that uvicorn's re-raise of the signal did nothing.
    [ "$code" -eq {EXIT_INTERRUPTED} ] || [ "$code" -eq 0 ] || {{
        echo "serve exited with $code" >&2; cat serve.log >&2; return 1; }}
}}
"""


def _delete_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


def variants(command: str) -> list[str]:
    """The command without its `[optional]` parts, then with each of them alone."""
    optional = re.findall(r"\s*\[([^\]]+)\]", command)
    bare = re.sub(r"\s*\[[^\]]+\]", "", command)
    return [bare] + [f"{bare} {part}" for part in optional]


def filled(command: str, setup: Setup) -> list[str]:
    """The command's placeholders replaced by values for this run."""
    values = {
        "--workspace": "acme",
        "--channel": "general",
        "--user": "u1",
        "--name": "Ada",
        "--hours": "1",
        "--pages": "2",
        "--messages": "20",
        "--concurrency": "2",
        "--runs": "1",
        "--quiet-wait": "0",
        "--json": str(setup.workdir / "bench.json"),
    }
    args = command.split()
    out: list[str] = []
    for arg in args:
        if arg == "ID":
            out.append(setup.message_id)
        elif re.fullmatch(r"[A-Z]", arg) and out and out[-1] in values:
            out.append(values[out[-1]])
        else:
            out.append(arg)
    return out


# Run by their own suites, at a size that takes minutes (tests/chaos, tests/test_cli.py).
HEAVY = {"chaos"}


@pytest.mark.parametrize("command", table_commands())
def test_each_command_of_the_table_runs_as_written(setup: Setup, command: str) -> None:
    for variant in variants(command):
        args = filled(variant, setup)
        if args[0] in HEAVY:
            done = subprocess.run(
                [str(setup.workdir / ".venv/bin/dualwrite"), args[0], "--help"],
                env=setup.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0
            for flag in (a for a in args if a.startswith("--")):
                assert flag in done.stdout, f"`{args[0]}` has no {flag}"
            continue
        done = subprocess.run(
            [str(setup.workdir / ".venv/bin/dualwrite"), *args],
            cwd=setup.workdir,
            env=setup.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{variant}: {done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr


def test_the_table_lists_the_commands_a_newcomer_needs() -> None:
    names = {c.split()[0] for c in table_commands()}
    assert {"history", "queue", "inspect", "reconcile", "migrate", "token", "bench"} <= names
    # Ids are given as printed: no `--` before one anywhere in the README.
    assert " -- ID" not in README and "-- -P" not in README
