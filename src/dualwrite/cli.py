"""The `dualwrite` command: a thin shell over the library (see `dualwrite --help`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dualwrite import local_serve
from dualwrite._files import raise_open_files_limit
from dualwrite.backends import BackendContext
from dualwrite.errors import (
    BackendUnavailable,
    BadSetting,
    DualWriteError,
    InvalidInput,
    SendFailed,
)
from dualwrite.history import DEFAULT_PAGE_SIZE
from dualwrite.ids import ID_LENGTH, PUSH_CHARS
from dualwrite.logs import RedactingFormatter
from dualwrite.model import User
from dualwrite.redact import redact_text, redact_url
from dualwrite.runtime import open_dualwrite
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings, parse_fault_spec

log = logging.getLogger(__name__)

# Exit codes (README: Commands).
EXIT_FAILED = 1
"""Not done: the send failed, the message was not found, a retry still fails, and the rest."""
EXIT_BAD_INPUT = 2
"""Refused before anything was done: bad input, flags or settings (argparse's code too)."""
EXIT_UNAVAILABLE = 3
"""A backend cannot be reached (Redis, PostgreSQL...): nothing was done."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT, as shells report it)."""

_CHAOS_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _backend_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backends (default: DUALWRITE_* variables, then embedded)")
    group.add_argument("--realtime", metavar="URL", help="realtime tier, e.g. redis://host:6379/0")
    group.add_argument("--store", metavar="URL", help="permanent store, e.g. postgresql://...")
    group.add_argument("--queue", metavar="PATH", help="retry-queue SQLite file")


def _port(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 65536:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port (1-65535)")
    return int(raw)


def _workers(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of processes (1 or more)")
    return int(raw)


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
    history.add_argument("--limit", type=int, default=DEFAULT_PAGE_SIZE)
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
        description="Save one message now, with the same id. Give the id as `history` prints "
        "it. Without --workspace/--channel it must wait in this queue (or be saved already); "
        "with them, a message queued elsewhere is saved from its realtime entry.",
    )
    target = queue_retry.add_mutually_exclusive_group(required=True)
    target.add_argument("message_id", nargs="?")
    target.add_argument("--all", action="store_true")
    queue_retry.add_argument("--workspace")
    queue_retry.add_argument("--channel")
    _backend_flags(queue_retry)

    serve = commands.add_parser("serve", help="run the chat server and its page")
    serve.add_argument(
        "--host", help=f"bind address (env DUALWRITE_HOST, default {ServerSettings.host})"
    )
    serve.add_argument(
        "--port", type=_port, help=f"bind port (env DUALWRITE_PORT, default {ServerSettings.port})"
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        help="server processes behind the one port (env DUALWRITE_WORKERS, default 1); more "
        "than one needs a realtime tier every process shares (Redis, Firebase) and no metrics",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="also answer to this Host header name (repeatable; env DUALWRITE_ALLOWED_HOSTS)",
    )
    serve.add_argument(
        "--fault",
        metavar="realtime=P,permanent=P",
        help="development only: fail that share of sends at the realtime write, and that "
        "share of permanent writes (first attempts and retries); each decided once",
    )
    serve.add_argument(
        "--dev-sign-in",
        action="store_true",
        default=None,
        help="development only: the page's sign-in form, which signs anyone in as anyone; "
        "refused unless the bind is loopback",
    )
    serve.add_argument(
        "--firebase-project",
        help="also accept Firebase ID tokens of this project (env DUALWRITE_FIREBASE_PROJECT)",
    )
    serve.add_argument(
        "--firebase-auth-emulator",
        action="store_true",
        default=None,
        help="development only: honour FIREBASE_AUTH_EMULATOR_HOST (unsigned Firebase tokens)",
    )
    serve.add_argument(
        "--metrics-host",
        help="serve /metrics on its own bind at this address (env DUALWRITE_METRICS_HOST)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help=f"port of --metrics-host (default {ServerSettings.metrics_port})",
    )
    serve.add_argument(
        "--send-rate",
        type=float,
        help=f"per-user sends a second, bursts of twice that; 0: off "
        f"(env DUALWRITE_SEND_RATE_PER_S, default {ServerSettings.send_rate_per_s:g})",
    )
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    _backend_flags(serve)

    token = commands.add_parser(
        "token", help="mint a bearer token for DUALWRITE_TOKEN_SECRET (needs the server extra)"
    )
    token.add_argument("--user", required=True, help="user id")
    token.add_argument("--name", required=True, help="display name")
    token.add_argument("--workspace", required=True)
    token.add_argument(
        "--hours",
        type=float,
        help="lifetime (default and most: DUALWRITE_TOKEN_MAX_LIFETIME_S, "
        f"{ServerSettings.token_max_lifetime_s // 3600} h)",
    )

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
        description="Give the id as `history` prints it; without --workspace/--channel the "
        "message is looked up by its id alone.",
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
        "--spread",
        action="store_true",
        help="reconcile target: also with the messages one to a channel (as many channels)",
    )
    bench.add_argument(
        "--subscribers", type=int, default=100, help="WebSocket subscribers (http target)"
    )
    bench.add_argument(
        "--baseline",
        choices=["none", "raw", "raw-batched"],
        default="none",
        help="also run the same backend work with bare clients, for a ratio (library target): "
        "raw awaits each message's writes in turn, raw-batched writes concurrent ones in one "
        "pipeline and one multi-row insert per batch (the practical ceiling)",
    )
    bench.add_argument(
        "--rate",
        type=float,
        metavar="SENDS_PER_S",
        help="start sends at this rate (at most --concurrency in flight) instead of as fast "
        "as they are answered",
    )
    bench.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the measurement N times and report each figure's median",
    )
    bench.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the 1-minute load average to fall "
        "to 0.5 (a run's own load takes a minute or two to fade)",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _backend_flags(bench)
    return parser


_DASH_ID = re.compile(f"-[{re.escape(PUSH_CHARS)}]{{{ID_LENGTH - 1}}}")


def _option_strings(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """Every option string of ``parser`` and its subcommands, and those that take a value."""
    every: set[str] = set()
    valued: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub_every, sub_valued = _option_strings(sub)
                every |= sub_every
                valued |= sub_valued
        every.update(action.option_strings)
        if action.option_strings and action.nargs != 0:
            valued.update(action.option_strings)
    return every, valued


def accept_dash_ids(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with each push id that starts with '-' made parseable as what it is.

    Ids made now start with '-' (their time prefix), which argparse takes for an unknown
    option. So that an id copied from `history` works as printed, one right after an option
    that takes a value becomes that option's value (``--opt=ID``), and any other is a
    positional: it moves behind a ``--``. Nothing after a ``--`` the user wrote is touched.
    """
    every, valued = _option_strings(parser)
    head: list[str] = []
    ids: list[str] = []
    rest: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            rest = list(argv[index + 1 :])
            break
        if _DASH_ID.fullmatch(arg) and arg not in every:
            if head and head[-1] in valued:
                head[-1] = f"{head[-1]}={arg}"
            else:
                ids.append(arg)
            continue
        head.append(arg)
    else:
        if not ids:
            return head
    return [*head, "--", *ids, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(accept_dash_ids(parser, sys.argv[1:] if argv is None else argv))
    stream = logging.StreamHandler()
    if args.verbose:
        stream.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[stream])
    else:
        # A one-shot command says what matters in a line each: errors, and a backend's
        # warning that it is down (its connect says what happens meanwhile).
        stream.setFormatter(RedactingFormatter("dualwrite: %(message)s"))
        logging.basicConfig(level=logging.ERROR, handlers=[stream])
        logging.getLogger("dualwrite.backends").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return _serve(args)  # it runs its own event loop, or uvicorn's supervisor
        return asyncio.run(_HANDLERS[args.command](args))
    except KeyboardInterrupt:
        # Ctrl-C: `serve` has shut down cleanly by now (uvicorn re-raises the signal after).
        return EXIT_INTERRUPTED
    except InvalidInput as error:
        print(f"dualwrite: invalid input: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadSetting as error:
        print(f"dualwrite: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SendFailed as error:
        cause = f" ({error.__cause__!r})" if error.__cause__ else ""
        print(redact_text(f"dualwrite: {error}{cause}"), file=sys.stderr)
        return EXIT_FAILED
    except BackendUnavailable as error:
        print(f"dualwrite: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except DualWriteError as error:
        # Driver errors may quote a connection string.
        print(redact_text(f"dualwrite: {error}"), file=sys.stderr)
        return EXIT_FAILED


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        realtime_url=args.realtime, store_url=args.store, queue_path=args.queue
    )


async def _send(args: argparse.Namespace) -> int:
    settings = _settings(args)
    user = User(args.user_id, args.user_name)
    # On the embedded memory:// tier a running `serve` holds the only tier its page listens
    # to: send through it, or say that this send reaches no one live (local_serve).
    silent: local_serve.ServeSilent | None = None
    try:
        serve = await asyncio.to_thread(local_serve.find, settings)
    except local_serve.ServeSilent as error:
        serve, silent = None, error
    if serve is not None:
        result = await asyncio.to_thread(
            local_serve.send_through,
            serve,
            args.workspace,
            args.channel,
            args.text,
            user,
            client_message_id=args.client_message_id,
            token_secret=ServerSettings.from_env().token_secret,
        )
    else:
        async with open_dualwrite(settings, background=False) as dw:
            result = await dw.send_message(
                args.workspace,
                args.channel,
                args.text,
                user,
                client_message_id=args.client_message_id,
            )
    print(f"{result.message_id} {result.status}")
    if serve is not None:
        print(f"dualwrite: sent through the serve at {serve.url}: delivered live", file=sys.stderr)
    elif local_serve.shares_memory_tier(settings):
        why = silent or f"no serve runs on {local_serve.announcement(settings).parent}/"
        print(
            f"dualwrite: {why}: delivered live to no one (the memory:// realtime tier lives in "
            "one process); a page shows it when it loads history",
            file=sys.stderr,
        )
    if result.warning:
        print(f"dualwrite: {result.warning}", file=sys.stderr)
        where = (
            "the serve's retry queue: it saves it"
            if serve
            else f"the retry queue {settings.queue_path}: a serve on it, or "
            "`dualwrite queue retry --all`, saves it"
        )
        print(f"dualwrite: it waits in {where}", file=sys.stderr)
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
        status = await dw.retry(args.message_id, args.workspace, args.channel)
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


def serve_settings(args: argparse.Namespace) -> tuple[Settings, ServerSettings]:
    """What `serve` runs on: the environment, then its flags."""
    faults = parse_fault_spec(args.fault) if args.fault else {}
    settings = Settings.from_env(
        realtime_url=args.realtime,
        store_url=args.store,
        queue_path=args.queue,
        fault_realtime=faults.get("fault_realtime"),
        fault_permanent=faults.get("fault_permanent"),
    )
    server_settings = ServerSettings.from_env(
        host=args.host,
        port=args.port,
        workers=args.workers,
        allowed_hosts=",".join(args.allowed_host) if args.allowed_host else None,
        dev_sign_in=args.dev_sign_in,
        firebase_project=args.firebase_project,
        firebase_auth_emulator=args.firebase_auth_emulator,
        send_rate_per_s=args.send_rate,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )
    return settings, server_settings


def _serve(args: argparse.Namespace) -> int:
    _needs_extra("uvicorn", "server", "serve")
    from dualwrite.logs import configure

    configure(verbose=True, json_lines=args.log_json)
    settings, server_settings = serve_settings(args)
    # Each socket is an open file: a soft limit of 1,024 would refuse connections long before
    # `ws_max_sockets`.
    open_files = raise_open_files_limit()
    if open_files < server_settings.ws_max_sockets + 256:
        log.warning(
            "open files limit %d is below %s=%d (plus the backends' connections): raise the "
            "hard limit (ulimit -Hn) or lower it",
            open_files,
            server_settings.env_name("ws_max_sockets"),
            server_settings.ws_max_sockets,
        )
    if server_settings.workers > 1:
        return _serve_workers(settings, server_settings, log_json=args.log_json)
    from uvicorn.loops.auto import auto_loop_factory

    # The loop uvicorn picks for its workers: uvloop where installed (the `server` extra).
    with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
        return runner.run(_serve_here(settings, server_settings))


def _serve_workers(settings: Settings, server_settings: ServerSettings, *, log_json: bool) -> int:
    """`serve --workers N`: checks here, then uvicorn's supervisor runs N processes."""
    from dualwrite.server import workers
    from dualwrite.server.app import check_exposure

    workers.check_workers(settings, server_settings)
    check_exposure(server_settings)
    # The backends are checked once, before any worker starts, so that one that cannot be
    # reached is one line and exit code 3 (main), not N workers failing to start; this also
    # creates the queue file (and, if asked, migrates the schema) once.
    asyncio.run(_check_backends(settings))
    app = workers.WorkerApp(
        settings, workers.shared_secret(server_settings), log_json, supervisor_pid=os.getpid()
    )
    for line in startup_lines(settings, server_settings):
        print(line, flush=True)
    try:
        outcome = workers.supervise(workers.worker_config(app))
    except SystemExit:
        return EXIT_FAILED  # the port is taken, say; uvicorn has logged why
    if outcome.signal is not None:
        workers.end_as_signalled(outcome.signal)
    if outcome.startup_failed:
        print(
            "dualwrite: a worker could not start (the log above says why); the server stopped",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


async def _check_backends(settings: Settings) -> None:
    try:
        async with open_dualwrite(settings, background=False):
            pass
    except BackendUnavailable as down:
        raise BackendUnavailable(f"{down}; the server did not start") from down


async def _serve_here(settings: Settings, server_settings: ServerSettings) -> int:
    """`serve` in this process (one worker): the server and the runtime share its loop."""
    uvicorn = _needs_extra("uvicorn", "server", "serve")
    from dualwrite.server.app import create_app, metrics_app
    from dualwrite.server.workers import server_config

    # The backends are opened before the server starts, so that one that cannot be reached
    # is one line and exit code 3 (main), not a traceback from inside uvicorn's lifespan.
    # The lifespan's shutdown closes them, within uvicorn's handling of Ctrl-C.
    runtime = contextlib.AsyncExitStack()
    try:
        dw = await runtime.enter_async_context(open_dualwrite(settings))
    except BackendUnavailable as down:
        raise BackendUnavailable(f"{down}; the server did not start") from down
    host, port = server_settings.host, server_settings.port

    @contextlib.asynccontextmanager
    async def lifespan_runtime() -> AsyncIterator[DualWrite]:
        # Within the lifespan: after a SIGTERM uvicorn re-raises it once shut down, which
        # ends the process before anything after `serve()` runs.
        async with runtime:
            with local_serve.announced(settings, host, port):
                yield dw

    app = create_app(settings, server_settings, open_runtime=lifespan_runtime)
    servers = [uvicorn.Server(server_config(app, server_settings))]
    if server_settings.metrics_host:
        servers.append(
            uvicorn.Server(
                uvicorn.Config(
                    metrics_app(),
                    host=server_settings.metrics_host,
                    port=server_settings.metrics_port,
                    log_config=None,
                    access_log=False,
                    lifespan="off",
                )
            )
        )
    for line in startup_lines(settings, server_settings):
        print(line, flush=True)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    except SystemExit:
        # uvicorn exits (its code 3) when it cannot start, the port being taken say; it has
        # logged why in one line. Our code 3 means a backend is down: this is not that.
        return EXIT_FAILED
    finally:
        await runtime.aclose()  # if the lifespan never ran
    return 0


def startup_lines(settings: Settings, server: ServerSettings) -> list[str]:
    """What `serve` prints when it starts: where, on what, and who can sign in."""
    base = f"http://{_url_host(server.host)}:{server.port}/"
    processes = f", {server.workers} worker processes" if server.workers > 1 else ""
    lines = [
        f"dualwrite: chat page at {base} "
        f"(realtime {redact_url(settings.realtime_url)}, store {redact_url(settings.store_url)}"
        f"{processes})"
    ]
    if server.dev_sign_in:
        lines.append(
            "dualwrite: DEVELOPMENT SIGN-IN IS ON: anyone who reaches "
            f"{base} can sign in as anyone, in any workspace"
        )
    elif server.token_secret is None and not server.firebase_project:
        lines.append(
            "dualwrite: nobody can sign in: set DUALWRITE_TOKEN_SECRET and mint tokens with "
            "`dualwrite token`, or pass --dev-sign-in (development, loopback only)"
        )
    if server.firebase_auth_emulator:
        lines.append("dualwrite: FIREBASE AUTH EMULATOR: unsigned Firebase tokens are accepted")
    if server.metrics_host:
        lines.append(
            f"dualwrite: metrics at http://{_url_host(server.metrics_host)}:"
            f"{server.metrics_port}/metrics"
        )
    return lines


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _token(args: argparse.Namespace) -> int:
    auth = _needs_extra("dualwrite.server.auth", "server", "token")
    Identity, TokenSigner = auth.Identity, auth.TokenSigner
    server_settings = ServerSettings.from_env()
    secret = server_settings.token_secret
    if secret is None:
        raise BadSetting("set DUALWRITE_TOKEN_SECRET (the one the server uses) to mint tokens")
    identity = Identity(User(args.user, args.name), args.workspace)
    lifetime = None if args.hours is None else int(args.hours * 3600)
    try:
        print(TokenSigner(secret, server_settings).mint(identity, lifetime_s=lifetime))
    except InvalidInput:
        raise
    except ValueError as error:
        raise BadSetting(f"--hours: {error}") from None
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
    if found.channel is None:
        print(
            f"message {found.message_id}: not in the permanent store, not in the realtime tier "
            "(never sent, or expired after an hour), not in this retry queue"
        )
        return EXIT_FAILED
    print(f"message {found.message_id} in {found.channel.workspace_id}/{found.channel.channel_id}")
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
    if urlsplit(settings.store_url).scheme not in ("postgresql", "postgres"):
        print(f"nothing to migrate: {redact_url(settings.store_url)} makes its own schema")
        return 0
    from dualwrite.backends.permanent import postgres

    context = BackendContext.from_settings(settings)
    version = await postgres.from_url(settings.store_url, context).migrate_now()
    print(f"migrated {redact_url(settings.store_url)} to schema version {version}")
    return 0


async def _bench(args: argparse.Namespace) -> int:
    bench = _needs_extra("dualwrite.tools.bench", "tools", "bench")
    if args.baseline != "none" and args.target != "library":
        # The raw baselines are bare client calls in this process; set beside HTTP sends they
        # would measure the HTTP layer (requests, auth, JSON, a second process), not dualwrite's.
        raise BadSetting(
            f"--baseline {args.baseline} compares with --target library only: it writes with "
            "bare clients in this process, so beside HTTP sends it would measure HTTP, not "
            "dualwrite"
        )
    if args.runs < 1:
        raise BadSetting("--runs must be 1 or more")
    if not (math.isfinite(args.quiet_wait) and args.quiet_wait >= 0):
        raise BadSetting("--quiet-wait must be 0 or more seconds")
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise BadSetting("--rate must be a number of sends a second above 0")
    # Every socket of the http target is a file descriptor here and in the server (which
    # raises its own limit too, and inherits this one).
    open_files = raise_open_files_limit()
    if args.target == "http" and open_files < args.subscribers + 100:
        raise BadSetting(
            f"--subscribers {args.subscribers} needs as many open files, and the limit here is "
            f"{open_files} (`ulimit -Hn`): raise it"
        )
    runs: list[dict[str, Any]] = []
    for number in range(1, args.runs + 1):
        label = f" before run {number} of {args.runs}" if args.runs > 1 else ""
        await bench.wait_for_quiet(args.quiet_wait, sys.stdout)
        load = bench.announce_load(sys.stdout, sys.stderr, label)
        with tempfile.TemporaryDirectory(prefix="dualwrite-bench-") as scratch:
            outcome = await _bench_once(args, bench, scratch)
        if isinstance(outcome, int):  # history or reconcile: printed already
            if outcome or number == args.runs:
                return outcome
            continue
        outcome.load = load
        figures = outcome.as_dict()
        runs.append(figures)
        if args.runs > 1:
            print(f"bench: run {number}: {bench.summary_line(figures)}", flush=True)
    figures = bench.median_figures(runs) if len(runs) > 1 else runs[0]
    if len(runs) > 1:
        figures["load_average"] = [run["load_average"] for run in runs]
        print(f"median of {len(runs)} runs:")
    print(bench.figures_table(figures))
    if args.json:
        if len(runs) > 1:
            figures["runs"] = runs
        await asyncio.to_thread(bench.write_json, args.json, figures)
    return 0


async def _bench_once(args: argparse.Namespace, bench: Any, scratch: str) -> Any:
    """One measurement (with its baseline): a `BenchReport`, or the exit code of a reading
    target, which prints its own figures."""
    # Unless told otherwise, measure the embedded default on scratch files.
    settings = Settings.from_env(
        store_url=args.store or f"sqlite:///{Path(scratch, 'messages.db')}",
        realtime_url=args.realtime,
        queue_path=args.queue or str(Path(scratch, "queue.db")),
    )
    labels = (redact_url(settings.realtime_url), redact_url(settings.store_url))
    if args.target in ("history", "reconcile"):
        return await _bench_reading(args, settings, scratch, labels)
    messages = args.messages or 10_000
    if args.target == "library":
        async with open_dualwrite(settings) as dw:
            report = await bench.run_library(
                dw,
                messages=messages,
                concurrency=args.concurrency,
                channels=args.channels,
                rate=args.rate,
                on_sent=bench.Progress(messages).advance,
            )
        report.realtime_url, report.store_url = labels
    else:
        with bench.bench_server(settings, scratch, args.subscribers) as server:
            report = await bench.run_http(
                server.base_url,
                server.token,
                messages=messages,
                concurrency=args.concurrency,
                subscribers=args.subscribers,
                channels=args.channels,
                server_pid=server.pid,
                metrics_token=server.metrics_token,
                labels=labels,
                rate=args.rate,
                on_sent=bench.Progress(messages).advance,
            )
    if args.baseline == "raw":
        report.baseline = await bench.run_raw(
            settings.realtime_url,
            settings.store_url,
            messages=messages,
            concurrency=args.concurrency,
            on_sent=bench.Progress(messages, label="sent (raw baseline)").advance,
        )
    elif args.baseline == "raw-batched":
        report.baseline = await bench.run_raw_batched(
            settings.realtime_url,
            settings.store_url,
            messages=messages,
            concurrency=args.concurrency,
            channels=args.channels,
            rate=args.rate,
            on_sent=bench.Progress(messages, label="sent (raw-batched baseline)").advance,
        )
    if args.baseline != "none":
        if report.baseline is None:
            print("bench: no raw baseline for these backends", file=sys.stderr)
        else:
            report.baseline.realtime_url, report.baseline.store_url = labels
    return report


# What each extra brings, as the modules a command imports (pyproject.toml lists the packages).
_EXTRA_MODULES = {
    "server": ("starlette", "uvicorn", "websockets", "jwt"),
    "tools": ("starlette", "uvicorn", "websockets", "jwt", "aiohttp", "httpx", "redis", "psycopg"),
}


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
        largest = args.messages or 100_000
        reconcile_sizes = sorted({min(10_000, largest), largest})
        report = await bench.run_reconcile(settings, reconcile_sizes, spread=args.spread)
        print(bench.reconcile_table(report))
    if args.json:
        await asyncio.to_thread(
            Path(args.json).write_text, json.dumps(report, indent=2, default=str) + "\n"
        )
    return 0


def _needs_extra(module: str, extra: str, command: str) -> Any:
    """Import what a command needs, or say which extra brings it."""
    try:
        for name in _EXTRA_MODULES[extra]:
            importlib.import_module(name)
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
    "token": _token,
    "bench": _bench,
}
