"""The `dualwrite` command as a user runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dualwrite.cli import accept_dash_ids, build_parser, main
from tests.conftest import store_url, unique


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DUALWRITE_STORE_URL", f"sqlite:///{tmp_path}/messages.db")
    monkeypatch.setenv("DUALWRITE_QUEUE_PATH", str(tmp_path / "queue.db"))
    return tmp_path


SEND = ["send", "--workspace", "acme", "--channel", "general", "--user-id", "u1"]


def test_send_then_history(embedded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SEND, "--user-name", "Ada", "hello 👋"]) == 0
    message_id, status = capsys.readouterr().out.split()
    assert status == "saved" and len(message_id) == 20
    assert main(["history", "--workspace", "acme", "--channel", "general", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["messageId"] == message_id and record["text"] == "hello 👋"
    assert record["saved"] is True


def test_bad_input_exits_2_naming_the_field(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*SEND, "--user-name", "", "hi"]) == 2
    assert "user.name" in capsys.readouterr().err


def test_queue_list_and_retry(embedded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queue", "list"]) == 0
    assert "0 waiting" in capsys.readouterr().out
    assert main(["queue", "retry", "--all"]) == 0
    assert "saved 0" in capsys.readouterr().out
    assert main(["queue", "retry", "-NoSuchMessageId1234"]) == 1
    assert "neither waiting in the retry queue nor saved" in capsys.readouterr().err


def test_bench_prints_figures_and_json(embedded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = embedded / "bench.json"
    assert main(["bench", "--messages", "50", "--concurrency", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "acknowledged sends/s" in printed.out and "memory://" in printed.out
    assert "50/50" in printed.err
    figures = json.loads(out.read_text())
    assert figures["outcomes"] == {"saved": 50}
    assert figures["send_latency_ms"]["count"] == 50
    assert figures["delivery_latency_ms"]["count"] == 50, "every message reached its subscriber"


def test_bench_raw_baseline_prints_a_ratio(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = embedded / "bench.json"
    args = ["bench", "--messages", "40", "--concurrency", "4", "--baseline", "raw"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("bench: load average ")
    table = printed[1:]
    assert table[-1].startswith("dualwrite / raw (sends/s)")
    figures = json.loads(out.read_text())
    assert figures["baseline_raw"]["outcomes"] == {"saved": 40}
    assert figures["ratio_to_raw"] > 0
    # Aligned: every row's column separator at the same place.
    two_columns = [line for line in table if "  |  " in line]
    assert len(two_columns) == len(table) - 1
    assert len({line.index("  |  ") for line in two_columns}) == 1


def test_bench_refuses_a_raw_baseline_beside_http_sends(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--target", "http", "--messages", "10", "--baseline", "raw"]
    assert main(args) == 2
    assert "--baseline raw compares with --target library only" in capsys.readouterr().err


def test_bench_http_target_drives_a_real_server(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = embedded / "bench.json"
    args = ["bench", "--target", "http", "--messages", "30", "--concurrency", "3"]
    assert main([*args, "--subscribers", "4", "--channels", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["target"] == "http"
    assert figures["outcomes"] == {"saved": 30}
    # Four subscribers over two channels: each message reaches two of them.
    assert figures["delivery_latency_ms"]["count"] == 60
    assert figures["cpu_s"] > 0 and figures["peak_rss_mb"] > 0
    # Read from the server's /metrics: a handful of sockets grows no heap enough to thaw.
    assert figures["connections"]["server_thaws"] == 0
    assert figures["connections"]["steal_s"] >= 0
    assert "server full collections during the sends" in capsys.readouterr().out


@pytest.mark.postgres
def test_migrate_creates_the_schema_a_send_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = os.environ.get("DUALWRITE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DUALWRITE_TEST_POSTGRES_URL is not set")
    from tests.conftest import _CREATED_SCHEMAS

    schema = unique("test_")
    _CREATED_SCHEMAS.append(schema)
    monkeypatch.setenv("DUALWRITE_STORE_URL", f"{url}?schema={schema}")
    monkeypatch.setenv("DUALWRITE_QUEUE_PATH", str(tmp_path / "queue.db"))
    assert main([*SEND, "--user-name", "Ada", "hi"]) == 1
    assert "dualwrite migrate" in capsys.readouterr().err
    assert main(["migrate"]) == 0
    assert main(["migrate"]) == 0  # idempotent
    assert main([*SEND, "--user-name", "Ada", "hi"]) == 0


def test_inspect_and_reconcile(embedded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SEND, "--user-name", "Ada", "hello"]) == 0
    message_id = capsys.readouterr().out.split()[0]
    where = ["--workspace", "acme", "--channel", "general"]
    assert main(["inspect", *where, "--", message_id]) == 0
    out = capsys.readouterr().out
    assert "permanent store: {" in out and '"text": "hello"' in out
    assert "(not queued here)" in out
    assert main(["reconcile"]) == 0
    assert "persisted 0" in capsys.readouterr().out


def sent_id(capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*SEND, "--user-name", "Ada", "hello"]) == 0
    message_id = capsys.readouterr().out.split()[0]
    assert message_id.startswith("-"), "ids made now start with '-' (their time prefix)"
    return message_id


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (["inspect", "{id}"], "message {id} in acme/general"),
        (["inspect", "{id}", "--workspace", "acme", "--channel", "general"], "in acme/general"),
        (["inspect", "--workspace", "acme", "{id}", "--channel", "general"], "in acme/general"),
        (["queue", "retry", "{id}"], "{id} saved"),
        (["queue", "retry", "{id}", "--workspace", "acme", "--channel", "general"], "{id} saved"),
    ],
    ids=lambda c: " ".join(c) if isinstance(c, list) else "",
)
def test_an_id_is_taken_as_printed_without_dash_dash(
    embedded: Path, capsys: pytest.CaptureFixture[str], command: list[str], expect: str
) -> None:
    message_id = sent_id(capsys)
    assert main([a.replace("{id}", message_id) for a in command]) == 0
    assert expect.replace("{id}", message_id) in capsys.readouterr().out


def test_a_client_message_id_may_start_with_a_dash(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = sent_id(capsys)  # an id copied from `history`, used as an idempotency key
    args = [*SEND, "--user-name", "Ada", "--client-message-id", key, "again"]
    parser = build_parser()
    assert parser.parse_args(accept_dash_ids(parser, args)).client_message_id == key
    assert main(args) == 0
    assert capsys.readouterr().out.endswith(" saved\n")


def test_an_argument_after_dash_dash_is_left_as_written(
    embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message_id = sent_id(capsys)
    assert main(["inspect", "--workspace", "acme", "--channel", "general", "--", message_id]) == 0
    assert f"message {message_id} in acme/general" in capsys.readouterr().out
    # A text that looks like an id is still the text.
    assert main([*SEND, "--user-name", "Ada", "--", message_id]) == 0
    assert main(["history", "--workspace", "acme", "--channel", "general", "--limit", "1"]) == 0
    assert f"Ada: {message_id}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind", [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_inspect_by_id_alone_finds_a_saved_message_on_each_store(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DUALWRITE_STORE_URL", store_url(kind, tmp_path))
    monkeypatch.setenv("DUALWRITE_QUEUE_PATH", str(tmp_path / "queue.db"))
    message_id = sent_id(capsys)
    # A new process: its in-memory realtime tier is empty, as an hour later anywhere.
    assert main(["inspect", message_id]) == 0
    out = capsys.readouterr().out
    assert f"message {message_id} in acme/general" in out
    assert "permanent store: {" in out and '"text": "hello"' in out
    assert main(["inspect", "-NoSuchMessageId1234"]) == 1
    assert "not in the permanent store" in capsys.readouterr().out


async def test_bench_keeps_its_figures_when_the_servers_metrics_do_not_answer() -> None:
    import aiohttp

    from dualwrite.tools.bench import _thaws
    from dualwrite.tools.serve_process import free_port

    async with aiohttp.ClientSession(f"http://127.0.0.1:{free_port()}") as nothing_listens:
        assert await _thaws(nothing_listens, "metrics-token-of-sixteen") is None
