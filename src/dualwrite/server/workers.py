"""`dualwrite serve --workers N`: N server processes behind one port, run by uvicorn.

The parent checks the settings and the backends, binds the port once, prints the startup
lines, and hands the socket to uvicorn's own supervisor (`Multiprocess`): it spawns the N
workers, restarts one that dies, and on Ctrl-C or SIGTERM stops them all (each shuts down as
a single `serve` does) before it exits. A worker builds its app with `WorkerApp`, which holds
the parent's `Settings` and `ServerSettings` themselves (pickled to the worker with uvicorn's
config): every worker runs on exactly what the flags and the environment gave the parent,
read once, and on one token secret (the parent draws it if none is configured).

What must be shared is: the realtime tier (live delivery and rate limits go through it), the
permanent store, and the retry queue, one SQLite file that every worker's retrier drains
(README: Several processes).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dualwrite.errors import BadSetting
from dualwrite.settings import ServerSettings, Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from uvicorn import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerApp:
    """The app factory a worker calls (uvicorn's ``factory=True``). Picklable; the server's
    imports (Starlette, the app) wait for the call, after the worker answers its supervisor."""

    settings: Settings
    server_settings: ServerSettings
    log_json: bool = False
    supervisor_pid: int = 0

    def __call__(self) -> Starlette:
        from dualwrite.logs import configure
        from dualwrite.server.app import create_app

        stop_with_supervisor(self.supervisor_pid)
        configure(verbose=True, json_lines=self.log_json)
        return create_app(self.settings, self.server_settings)


_PR_SET_PDEATHSIG = 1


def stop_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send this worker SIGTERM (a clean shutdown) when its supervisor dies.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers: they
    would go on serving the port, unsupervised and under a name without `serve` in it, and
    the next `serve` would find the port taken. Linux only (prctl); elsewhere they stay.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if supervisor_pid and os.getppid() != supervisor_pid:
        os.kill(os.getpid(), signal.SIGTERM)  # it died before the line above


def check_workers(settings: Settings, server: ServerSettings) -> None:
    """Refuse, before anything starts, what several processes cannot share."""
    workers = server.workers
    if workers == 1:
        return
    flag = f"--workers {workers}"
    if urlsplit(settings.realtime_url).scheme == "memory":
        raise BadSetting(
            f"{flag} needs a realtime tier that every process shares: memory:// lives inside "
            "one process, so each worker's sockets would get only the messages sent through "
            "that worker; give --realtime redis://... (or firebase-rtdb://...), or run one worker"
        )
    if urlsplit(settings.store_url).scheme == "memory":
        raise BadSetting(
            f"{flag} needs a permanent store that every process shares: the memory:// store "
            "lives inside one process; give --store postgresql://... (or sqlite:///...)"
        )
    if server.metrics_host or server.metrics_token:
        where = "--metrics-host" if server.metrics_host else "DUALWRITE_METRICS_TOKEN"
        raise BadSetting(
            f"{flag} with {where}: metrics are counted per process, so /metrics would show "
            "one worker's figures as the server's; to scrape metrics run one process per port "
            "(--workers 1, several `serve` behind your proxy), each with its own /metrics"
        )


def shared_secret(server: ServerSettings) -> ServerSettings:
    """``server`` with a token secret every worker shares: the configured one, else one drawn
    now (a token signed by one worker must pass at the others)."""
    if server.token_secret is not None:
        return server
    log.warning(
        "DUALWRITE_TOKEN_SECRET is not set: using a random secret, shared by this server's "
        "workers; tokens end with this server"
    )
    return replace(server, token_secret=secrets.token_urlsafe(48))


def server_config(app: Any, server: ServerSettings, **more: Any) -> Config:
    """uvicorn's config of the main bind, for one process or (with ``more``) for workers."""
    import uvicorn

    from dualwrite.server.wsprotocol import LeanWebSocketProtocol

    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_config=None,
        # Request lines carry URLs (and a `?token=` some clients still send): off.
        access_log=False,
        # Clients send one frame, their token; anything bigger is closed with 1009 before it
        # is read into memory.
        ws_max_size=server.ws_first_frame_bytes,
        # h11 even where httptools is installed (uvicorn would take it): uvicorn bounds what
        # h11 buffers of an unfinished request (16 KB), and nothing bounds httptools' headers
        # (one client sending 100 MB of header stalled the process and took 300 MB).
        http="h11",
        ws_per_message_deflate=server.ws_per_message_deflate,
        # uvicorn's own sans-I/O protocol, holding less per open socket.
        ws=LeanWebSocketProtocol,
        server_header=False,
        # A client's address (per-address caps, logs) is its peer's: `X-Forwarded-For` is not
        # trusted (docs/security.md), not even from loopback, where uvicorn trusts it by default.
        proxy_headers=False,
        **more,
    )


def worker_config(app: WorkerApp) -> Config:
    """uvicorn's config for the workers: the app factory and the number of processes."""
    return server_config(
        app,
        app.server_settings,
        factory=True,
        workers=app.server_settings.workers,
        timeout_worker_healthcheck=app.server_settings.worker_healthcheck_s,
    )


@dataclass(frozen=True)
class Outcome:
    """How the supervisor ended: the signal that stopped it, or a worker that never started."""

    signal: int | None
    startup_failed: bool


def supervise(config: Config) -> Outcome:
    """Bind the port once, run the workers until a signal stops them (blocking; main thread).

    Raises SystemExit (uvicorn's code 3, after logging why) if the port cannot be bound.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    stopped_by: list[int] = []

    class Supervisor(Multiprocess):
        # uvicorn's own handlers, which also say which signal ended the run.
        def handle_int(self) -> None:
            stopped_by.append(signal.SIGINT)
            super().handle_int()

        def handle_term(self) -> None:
            stopped_by.append(signal.SIGTERM)
            super().handle_term()

    socket = config.bind_socket()
    try:
        supervisor = Supervisor(config, sockets=[socket])
        supervisor.run()
    finally:
        socket.close()
    return Outcome(
        signal=stopped_by[0] if stopped_by else None,
        startup_failed=any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes),
    )


def end_as_signalled(signum: int) -> None:
    """End as a single `serve` does after this signal (uvicorn re-raises it once shut down):
    Ctrl-C is a KeyboardInterrupt (exit code 130), SIGTERM the signal's default action."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
