"""The `dualwrite` command: a thin shell over the library (see `dualwrite --help`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from dualwrite.backends import BackendContext, create_permanent_store
from dualwrite.errors import BadSetting, DualWriteError, InvalidInput, SendFailed
from dualwrite.model import User
from dualwrite.runtime import open_dualwrite
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings, parse_fault_spec, redact_url

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_CHAOS_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _backend_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backends (default: DUALWRITE_* variables, then embedded)")
    group.add_argument("--realtime", metavar="URL", help="realtime tier, e.g. redis://host:6379/0")
    group.add_argument("--store", metavar="URL", help="permanent store, e.g. postgresql://...")
    group.add_argument("--queue", metavar="PATH", help="retry-queue SQLite file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualwrite",
        description="Chat messages to a realtime tier first and a permanent store second.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = commands.add_parser("send", help="send one message")
    send.add_argument("text")
    send.add_argument("--workspace", required=True)
    send.add_argument("--channel", required=True)
    send.add_argument("--user-id", required=True)
    send.add_argument("--user-name", required=True)
    send.add_argument("--client-message-id", help="idempotency key: repeat to retry safely")
    _backend_flags(send)

    history = commands.add_parser("history", help="show a channel, newest first")
    history.add_argument("--workspace", required=True)
    history.add_argument("--channel", required=True)
    history.add_argument("--limit", type=int, default=50)
    history.add_argument("--before", help="cursor printed at the end of the previous page")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    _backend_flags(history)

    queue = commands.add_parser("queue", help="the retry queue of unsaved messages")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    queue_list = queue_commands.add_parser("list", help="list waiting writes")
    _backend_flags(queue_list)
    queue_retry = queue_commands.add_parser(
        "retry",
        help="retry one message id, or --all",
        description="Ids may start with '-': put -- before one (queue retry -- -P7Gq...).",
    )
    target = queue_retry.add_mutually_exclusive_group(required=True)
    target.add_argument("message_id", nargs="?")
    target.add_argument("--all", action="store_true")
    _backend_flags(queue_retry)

    serve = commands.add_parser("serve", help="run the chat server and its page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--fault",
        metavar="realtime=P,permanent=P",
        help="development only: fail that share of backend calls on purpose",
    )
    serve.add_argument(
        "--dev-sign-in",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the page's development sign-in (default: on without DUALWRITE_TOKEN_SECRET)",
    )
    serve.add_argument(
        "--firebase-project",
        help="also accept Firebase ID tokens of this project (env DUALWRITE_FIREBASE_PROJECT)",
    )
    serve.add_argument(
        "--send-rate",
        type=float,
        help=f"per-user sends a second, bursts of twice that; 0: off "
        f"(env DUALWRITE_SEND_RATE_PER_S, default {ServerSettings.send_rate_per_s:g})",
    )
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    _backend_flags(serve)

    token = commands.add_parser("token", help="mint a development bearer token")
    token.add_argument("--user", required=True, help="user id")
    token.add_argument("--name", required=True, help="display name")
    token.add_argument("--workspace", required=True)
    token.add_argument("--hours", type=int, default=12)

    reconcile = commands.add_parser(
        "reconcile", help="save delivered messages that were neither saved nor queued"
    )
    reconcile.add_argument(
        "--grace",
        type=float,
        help=f"seconds a message is left alone (default {Settings.reconcile_grace_s:g})",
    )
    _backend_flags(reconcile)

    inspect = commands.add_parser(
        "inspect",
        help="one message in the realtime tier, the permanent store and the queue",
        description="Ids may start with '-': put -- before one (inspect -- -P7Gq...).",
    )
    inspect.add_argument("message_id")
    inspect.add_argument("--workspace")
    inspect.add_argument("--channel")
    _backend_flags(inspect)

    chaos = commands.add_parser(
        "chaos",
        help="send through two servers while faults are injected; check nothing is lost "
        "(needs the tools extra)",
    )
    chaos.add_argument("--messages", type=int, default=1000)
    chaos.add_argument("--concurrency", type=int, default=8)
    chaos.add_argument("--spacing", type=float, default=1.5, help="seconds between faults")
    chaos.add_argument(
        "--postgres",
        help="PostgreSQL to run against, a fresh schema made and dropped (env "
        f"DUALWRITE_CHAOS_POSTGRES_URL, default {_CHAOS_POSTGRES})",
    )

    migrate = commands.add_parser("migrate", help="create or upgrade the permanent store's schema")
    _backend_flags(migrate)

    bench = commands.add_parser("bench", help="measure sends/s and latency (needs the tools extra)")
    bench.add_argument(
        "--messages",
        type=int,
        help="sends to make (default 10,000); for history and reconcile, the messages the "
        "channel is filled with (default 100,000), measured beside a small channel",
    )
    bench.add_argument("--concurrency", type=int, default=64)
    bench.add_argument("--channels", type=int, default=8)
    bench.add_argument(
        "--target",
        choices=["library", "http", "history", "reconcile"],
        default="library",
        help="sends through the library or a `serve` process over HTTP; history pages; "
        "a reconcile round",
    )
    bench.add_argument(
        "--pages", type=int, default=200, help="pages read per figure (history target)"
    )
    bench.add_argument(
        "--subscribers", type=int, default=100, help="WebSocket subscribers (http target)"
    )
    bench.add_argument(
        "--baseline",
        choices=["none", "raw"],
        default="none",
        help="also run the same backend work with bare clients, for a ratio",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _backend_flags(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handler = _HANDLERS[args.command]
    try:
        return asyncio.run(handler(args))
    except InvalidInput as error:
        print(f"dualwrite: invalid input: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SendFailed as error:
        print(f"dualwrite: {error} ({error.__cause__!r})", file=sys.stderr)
        return EXIT_FAILED
    except DualWriteError as error:
        print(f"dualwrite: {error}", file=sys.stderr)
        return EXIT_FAILED


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        realtime_url=args.realtime, store_url=args.store, queue_path=args.queue
    )


async def _send(args: argparse.Namespace) -> int:
    async with open_dualwrite(_settings(args), background=False) as dw:
        result = await dw.send_message(
            args.workspace,
            args.channel,
            args.text,
            User(args.user_id, args.user_name),
            client_message_id=args.client_message_id,
        )
    print(f"{result.message_id} {result.status}")
    if result.warning:
        print(f"dualwrite: {result.warning}", file=sys.stderr)
    return 0


async def _history(args: argparse.Namespace) -> int:
    async with open_dualwrite(_settings(args), background=False) as dw:
        page = await dw.history(args.workspace, args.channel, args.before, args.limit)
    for message in page.messages:
        if args.json:
            print(json.dumps(message.to_wire(), ensure_ascii=False))
        else:
            mark = "" if message.saved else "  (not saved yet)"
            print(f"{message.message_id}  {message.user_name}: {message.text}{mark}")
    if page.next_before and not args.json:
        print(f"-- more: --before {page.next_before}")
    return 0


async def _queue(args: argparse.Namespace) -> int:
    async with open_dualwrite(_settings(args), background=False) as dw:
        if args.queue_command == "list":
            return await _queue_list(dw)
        if args.all:
            report = await dw.retry_all()
            print(f"saved {len(report.saved)}, still failing {len(report.failed)}")
            return 0 if not report.failed else EXIT_FAILED
        status = await dw.retry(args.message_id)
        print(f"{args.message_id} {'saved' if status == 'saved' else 'still failing'}")
        return 0 if status == "saved" else EXIT_FAILED


async def _queue_list(dw: DualWrite) -> int:
    entries = await dw.pending()
    for entry in entries:
        w = entry.write
        print(
            f"{w.message_id}  {w.channel.workspace_id}/{w.channel.channel_id}  "
            f"attempts={entry.attempts}  last_error={entry.last_error}"
        )
    print(f"{len(entries)} waiting")
    return 0


async def _serve(args: argparse.Namespace) -> int:
    uvicorn = _needs_extra("uvicorn", "server", "serve")
    from dualwrite.logs import configure
    from dualwrite.server import create_app

    configure(verbose=True, json_lines=args.log_json)
    faults = parse_fault_spec(args.fault) if args.fault else {}
    settings = Settings.from_env(
        realtime_url=args.realtime,
        store_url=args.store,
        queue_path=args.queue,
        fault_realtime=faults.get("fault_realtime"),
        fault_permanent=faults.get("fault_permanent"),
    )
    server_settings = ServerSettings.from_env(
        dev_sign_in=args.dev_sign_in,
        firebase_project=args.firebase_project,
        send_rate_per_s=args.send_rate,
    )
    app = create_app(settings, server_settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False)
    )
    print(
        f"dualwrite: chat page at http://{args.host}:{args.port}/ "
        f"(realtime {redact_url(settings.realtime_url)}, store {redact_url(settings.store_url)})",
        flush=True,
    )
    await server.serve()
    return 0


async def _token(args: argparse.Namespace) -> int:
    from dualwrite.server.auth import Identity, TokenSigner

    secret = ServerSettings.from_env().token_secret
    if secret is None:
        raise BadSetting("set DUALWRITE_TOKEN_SECRET (the one the server uses) to mint tokens")
    identity = Identity(User(args.user, args.name), args.workspace)
    print(TokenSigner(secret).mint(identity, lifetime_s=args.hours * 3600))
    return 0


async def _reconcile(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        realtime_url=args.realtime,
        store_url=args.store,
        queue_path=args.queue,
        reconcile_grace_s=args.grace,
    )
    async with open_dualwrite(settings, background=False) as dw:
        report = await dw.reconcile()
    print(
        f"channels {report.channels}, scanned {report.scanned}, "
        f"persisted {report.persisted}, failed {report.failed}"
    )
    return EXIT_FAILED if report.failed else 0


async def _inspect(args: argparse.Namespace) -> int:
    async with open_dualwrite(_settings(args), background=False) as dw:
        found = await dw.inspect(args.message_id, args.workspace, args.channel)
    where = f"{found.channel.workspace_id}/{found.channel.channel_id}" if found.channel else "?"
    print(f"message {found.message_id} in {where}")
    print(
        "realtime tier  :",
        json.dumps(found.realtime.to_wire(), ensure_ascii=False)
        if found.realtime
        else "(absent or expired)",
    )
    print(
        "permanent store:",
        json.dumps(found.permanent.to_wire(), ensure_ascii=False)
        if found.permanent
        else "(absent)",
    )
    if found.queued:
        q = found.queued
        print(
            f"retry queue    : waiting, attempts={q.attempts}, "
            f"next_attempt_at={q.next_attempt_at}, last_error={q.last_error}"
        )
    else:
        print("retry queue    : (not queued here)")
    return 0 if (found.realtime or found.permanent or found.queued) else EXIT_FAILED


async def _chaos(args: argparse.Namespace) -> int:
    chaos = _needs_extra("dualwrite.tools.chaos", "tools", "chaos")
    postgres = args.postgres or os.environ.get("DUALWRITE_CHAOS_POSTGRES_URL", _CHAOS_POSTGRES)
    report = await chaos.run_chaos(
        postgres,
        messages=args.messages,
        concurrency=args.concurrency,
        spacing_s=args.spacing,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(chaos.describe(report))
    return 0 if report.ok else EXIT_FAILED


async def _migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = create_permanent_store(settings.store_url, BackendContext(migrate_on_start=True))
    await store.connect()
    await store.close()
    print(f"migrated {settings.store_url}")
    return 0


async def _bench(args: argparse.Namespace) -> int:
    bench = _needs_extra("dualwrite.tools.bench", "tools", "bench")
    Progress, run_http, run_library = bench.Progress, bench.run_http, bench.run_library
    run_raw, write_json = bench.run_raw, bench.write_json

    with tempfile.TemporaryDirectory(prefix="dualwrite-bench-") as scratch:
        # Unless told otherwise, measure the embedded default on scratch files.
        settings = Settings.from_env(
            store_url=args.store or f"sqlite:///{Path(scratch, 'messages.db')}",
            realtime_url=args.realtime,
            queue_path=args.queue or str(Path(scratch, "queue.db")),
        )
        labels = (redact_url(settings.realtime_url), redact_url(settings.store_url))
        if args.target in ("history", "reconcile"):
            return await _bench_reading(args, settings, scratch, labels)
        args.messages = args.messages or 10_000
        if args.target == "library":
            async with open_dualwrite(settings) as dw:
                report = await run_library(
                    dw,
                    messages=args.messages,
                    concurrency=args.concurrency,
                    channels=args.channels,
                    on_sent=Progress(args.messages).advance,
                )
            report.realtime_url, report.store_url = labels
        else:
            with bench.bench_server(settings, scratch) as (base, token, pid):
                report = await run_http(
                    base,
                    token,
                    messages=args.messages,
                    concurrency=args.concurrency,
                    subscribers=args.subscribers,
                    channels=args.channels,
                    server_pid=pid,
                    labels=labels,
                    on_sent=Progress(args.messages).advance,
                )
        if args.baseline == "raw":
            report.baseline = await run_raw(
                settings.realtime_url,
                settings.store_url,
                messages=args.messages,
                concurrency=args.concurrency,
                on_sent=Progress(args.messages, label="sent (raw baseline)").advance,
            )
            if report.baseline is None:
                print("bench: no raw baseline for these backends", file=sys.stderr)
            else:
                report.baseline.realtime_url, report.baseline.store_url = labels
    print(report.table())
    if args.json:
        await asyncio.to_thread(write_json, args.json, report)
    return 0


async def _bench_reading(
    args: argparse.Namespace, settings: Settings, scratch: str, labels: tuple[str, str]
) -> int:
    """`bench --target history|reconcile`: what reading costs as a channel grows."""
    bench = _needs_extra("dualwrite.tools.bench_history", "tools", "bench")
    print(f"realtime tier {labels[0]}, permanent store {labels[1]}")
    if args.target == "history":
        sizes = (1_000, args.messages or 100_000)
        shared = not settings.realtime_url.startswith("memory:")
        report = await bench.run_history(settings, scratch, sizes, args.pages, http=shared)
        print(bench.history_table(report))
    else:
        sizes = (10_000, args.messages or 100_000)
        report = await bench.run_reconcile(settings, sizes)
        print(bench.reconcile_table(report))
    if args.json:
        await asyncio.to_thread(
            Path(args.json).write_text, json.dumps(report, indent=2, default=str) + "\n"
        )
    return 0


def _needs_extra(module: str, extra: str, command: str) -> Any:
    """Import what a command needs, or say which extra brings it."""
    try:
        importlib.import_module("aiohttp" if extra == "tools" else module)
        return importlib.import_module(module)
    except ImportError as missing:
        raise BadSetting(
            f"`dualwrite {command}` needs the {extra} extra: pip install 'dualwrite[{extra}]' "
            f"({missing.name} is missing)"
        ) from None


_HANDLERS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "send": _send,
    "history": _history,
    "queue": _queue,
    "migrate": _migrate,
    "chaos": _chaos,
    "reconcile": _reconcile,
    "inspect": _inspect,
    "serve": _serve,
    "token": _token,
    "bench": _bench,
}
