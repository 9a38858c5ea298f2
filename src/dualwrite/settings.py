"""Configuration: two dataclasses, read from environment variables or given.

`Settings` is what `open_dualwrite` needs; `ServerSettings` is what `dualwrite serve` adds on
top. Every default is written here once: the classes that receive these values take no defaults
of their own.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from dualwrite.errors import BadSetting

_S = TypeVar("_S", bound="_FromEnv")


class _FromEnv:
    """Defaults, then `{PREFIX}<FIELD>` variables, then keyword overrides; then `check()`."""

    _ENV_PREFIX: ClassVar[str] = "DUALWRITE_"
    _ENV_NAMES: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_env(cls: type[_S], environ: Mapping[str, str] | None = None, **overrides: Any) -> _S:
        """Defaults, then environment variables, then ``overrides``.

        ``overrides`` whose value is None are ignored, so CLI flags can be passed as they are.
        """
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = cls.env_name(f.name)
            if name in env:
                parsed = _parse(name, env[name], hints[f.name])
                if parsed is not _UNSET:
                    values[f.name] = parsed
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)  # type: ignore[type-var]
        settings.check()
        return settings

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable that sets ``field_name``."""
        return cls._ENV_NAMES.get(field_name, f"{cls._ENV_PREFIX}{field_name.upper()}")

    def check(self) -> None:
        """Raise `BadSetting` for a value that cannot be used."""

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise BadSetting(f"{self.env_name(name)} must be a positive number, not {value}")


@dataclass(frozen=True)
class Settings(_FromEnv):
    """Everything `open_dualwrite` needs. Defaults run with no server at all."""

    _ENV_NAMES: ClassVar[Mapping[str, str]] = {"sentry_dsn": "SENTRY_DSN"}

    realtime_url: str = "memory://"
    """`memory://`, `redis://host:port/db`, `firebase-rtdb://...`"""
    store_url: str = "sqlite:///dualwrite-data/messages.db"
    """`sqlite:///path`, `postgresql://...`, `firestore://PROJECT`, `memory://`"""
    queue_path: str = "dualwrite-data/retry-queue.db"
    """Local SQLite file of the durable retry queue; the workers of a `serve` share it, and
    the CLI's `queue` commands open it beside them."""
    realtime_timeout_s: float = 2.0
    """Bound on one realtime-tier call; a send whose realtime write takes longer fails."""
    realtime_threads: int = 16
    """Worker threads for a realtime tier whose driver blocks (Firebase), its own pool, so a
    slow database never queues sends behind other work in asyncio's default pool."""
    permanent_timeout_s: float = 5.0
    """Bound on one permanent-store call; a save that takes longer is queued."""
    max_text_chars: int = 40_000
    retry_base_s: float = 1.0
    """Backoff of the retry queue: attempt n waits up to min(cap, base * 2**n)."""
    retry_cap_s: float = 300.0
    retry_poll_s: float = 1.0
    sweep_interval_s: float = 60.0
    sweep_timeout_s: float = 30.0
    """Bound on one sweep of the realtime tier (it visits every channel)."""
    reconcile_interval_s: float = 60.0
    reconcile_grace_s: float = 30.0
    """The reconciler leaves messages younger than this to their own send."""
    reconcile_batch: int = 500
    """Unsaved marks the reconciler reads and checks (one store lookup) at a time."""
    sentry_dsn: str | None = None
    migrate_on_start: bool = False
    """Create or upgrade the permanent store's schema on connect (else: `dualwrite migrate`)."""
    group_commit: bool = True
    """Coalesce concurrent permanent writes into one round trip (`dualwrite.group_commit`)."""
    group_max_batch: int = 256
    group_max_in_flight: int = 4
    group_max_wait_ms: float = 0.0
    """Hold a batch this long for more writes (0: only what queued while the last was out)."""
    outage_reminder_s: float = 300.0
    """While a backend stays down, background work says so in the log at most this often."""
    live_buffer: int = 1000
    """Live entries one listener (socket) may let wait; past that it is closed (1013) and
    resumes after its last cursor."""
    live_replay_page: int = 500
    """Entries a resume reads per round trip, until caught up."""
    live_replay_window_s: float = 60.0
    """A resume by message id (and any resume on Firebase, whose ids follow creation order,
    not write order) replays this much before its point; clients drop ids they have."""
    live_streams_per_read: int = 25
    """Channels one live reader follows per blocking read (Redis: streams per XREAD, on a
    connection of its own). Each message read costs in proportion to this, in the process and
    in Redis (a blocking XREAD names, and Redis blocks it on, every stream again): 1,000 cost a
    busy process a quarter of its CPU at 1,000 channels; at 100, Redis spent 0.5-2 ms on each
    XREAD, and the writes queued behind them; 25 cost one reader connection per 25 watched
    channels."""
    fault_realtime: float = 0.0
    """Development only: the probability that a realtime call fails on purpose."""
    fault_permanent: float = 0.0
    """Development only: the probability that a permanent-store call fails on purpose."""
    memory_max_bytes: int = 256 * 1024 * 1024
    """The `memory://` realtime tier's cap on what it holds (message text and names, in
    UTF-8 bytes); over it a send fails rather than evict anything unsaved."""
    memory_max_claims: int = 1_000_000
    """The `memory://` tier's cap on idempotency keys (`clientMessageId`) held for an hour."""
    memory_max_buckets: int = 100_000
    """The `memory://` tier's cap on rate-limit buckets (full ones are forgotten first)."""

    def check(self) -> None:
        self._positive(
            "memory_max_bytes",
            "memory_max_claims",
            "memory_max_buckets",
            "realtime_timeout_s",
            "permanent_timeout_s",
            "retry_base_s",
            "retry_cap_s",
            "retry_poll_s",
            "sweep_interval_s",
            "sweep_timeout_s",
            "reconcile_interval_s",
            "reconcile_grace_s",
            "outage_reminder_s",
            "live_buffer",
            "live_replay_page",
            "live_streams_per_read",
        )
        if self.live_replay_window_s < 0:
            raise BadSetting("live_replay_window_s must be 0 or more")
        for name in ("fault_realtime", "fault_permanent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BadSetting(f"{self.env_name(name)} must be a probability from 0 to 1")
        self._positive(
            "group_max_batch",
            "group_max_in_flight",
            "max_text_chars",
            "realtime_threads",
            "reconcile_batch",
        )
        if not (math.isfinite(self.group_max_wait_ms) and self.group_max_wait_ms >= 0):
            raise BadSetting(f"{self.env_name('group_max_wait_ms')} must be 0 or more")


@dataclass(frozen=True)
class ServerSettings(_FromEnv):
    """What `dualwrite serve` adds: sign-in, limits of the HTTP API, the WebSocket."""

    host: str = "127.0.0.1"
    """The bind address (`serve --host`)."""
    port: int = 8000
    """The bind port (`serve --port`)."""
    workers: int = 1
    """Server processes behind the one port (`serve --workers`), run by uvicorn's supervisor;
    more than one needs a realtime tier and a permanent store that every process shares."""
    worker_healthcheck_s: int = 15
    """With workers: one that does not answer its supervisor's ping within this is replaced.
    A worker answers once it has started Python and imported dualwrite (over uvicorn's 5 s,
    and again for every replacement, on a loaded machine); a worker that dies while pinged
    is seen only when this runs out."""
    token_secret: str | None = None
    """HMAC secret of bearer tokens (32+ characters); unset: a random one per server (drawn
    by the parent of `serve --workers`, shared by its workers)."""
    token_max_lifetime_s: int = 24 * 3600
    """Tokens whose `exp` lies further than this after their `iat` (or now) are refused."""
    token_issuer: str = "dualwrite"
    """The `iss` claim minted and required."""
    token_audience: str = "dualwrite"
    """The `aud` claim minted and required."""
    dev_sign_in: bool = False
    """Serve `POST /api/dev/token` (anyone signs in as anyone): only with `--dev-sign-in`,
    and only on a loopback bind."""
    allowed_hosts: str = ""
    """Comma-separated extra `Host` names accepted besides the bind address (and, on a
    loopback bind, localhost names); `*` accepts any (behind a proxy that checks it)."""
    firebase_project: str | None = None
    """Also accept Firebase ID tokens of this project (uid, name, `workspaceId` claim)."""
    firebase_auth_emulator: bool = False
    """Development only: honour `FIREBASE_AUTH_EMULATOR_HOST` (unsigned Firebase tokens)."""
    send_rate_per_s: float = 10.0
    """Per-user sends a second, bursts of twice that; 0: off. Shared by every process on a
    shared realtime tier (Redis, Firebase), per process on `memory://`."""
    send_bytes_per_s: float = 64 * 1024
    """Per-user text bytes a second (UTF-8), bursts of 8 times that; 0: off."""
    channel_bytes_per_s: float = 256 * 1024
    """Per-channel text bytes a second from all its users, bursts of 8 times that; 0: off."""
    read_rate_per_s: float = 10.0
    """Per-user history pages, persists and socket connects a second (each its own bucket),
    bursts of twice that; 0: off."""
    sign_in_rate_per_s: float = 1.0
    """Dev sign-ins a second per client address, bursts of 10; 0: off."""
    rate_limit_skip_s: float = 10.0
    """After the realtime tier failed to answer a rate-limit call, limits are skipped this
    long, so that an outage does not add a timeout to every request."""
    max_history: int = 200
    """The largest page `GET .../messages?limit=` serves."""
    max_history_bytes: int = 1024 * 1024
    """A history page stops before this many bytes of text (`nextBefore` continues it)."""
    max_body_bytes: int = 256 * 1024
    ws_auth_timeout_s: float = 2.0
    """A socket that has not sent its token by then is closed (4401)."""
    ws_first_frame_bytes: int = 4096
    """The largest frame a client may send (its token); larger: closed with 1009."""
    ws_max_unauthenticated: int = 256
    """Sockets of this process still waiting for their token; more: refused (HTTP 403)."""
    ws_max_unauthenticated_per_address: int = 32
    """Of those, from one client address (so one flooder cannot hold them all); behind a
    reverse proxy every client has its address: raise it to `ws_max_unauthenticated`."""
    ws_max_per_user: int = 20
    """Live sockets one user may hold on this process; more: closed with 1008."""
    ws_max_sockets: int = 10_000
    """Live sockets on this process; more: closed with 1008."""
    ws_per_message_deflate: bool = False
    """Compress socket frames (permessage-deflate) when the client offers it, as browsers do.
    Off: the frames are small JSON, and each socket would hold its own zlib state (some 35 KB,
    more than the rest of an idle socket) and compress every frame again for itself."""
    gc_thaw_s: float = 3600.0
    """The survivors of each garbage collection are frozen (later collections skip them: short
    pauses with thousands of sockets), and collected once more when the heap has grown by a
    quarter and at the latest this often, so that cycles among them (closed sockets) are freed;
    0: CPython's collector unchanged (`dualwrite.server.collector`)."""
    metrics_token: str | None = None
    """Serve `/metrics` on the main bind behind `Authorization: Bearer <this>` (16+
    characters); unset: `/metrics` only on `--metrics-host`, if given."""
    metrics_host: str | None = None
    """Serve `/metrics` (unauthenticated) on its own bind at this address."""
    metrics_port: int = 9108
    """The port of `metrics_host`."""

    def check(self) -> None:
        # An empty secret is refused, not taken as unset: it would turn dev sign-in on.
        if self.token_secret is not None and len(self.token_secret) < 32:
            raise BadSetting(f"{self.env_name('token_secret')} must be at least 32 characters")
        if self.metrics_token is not None and len(self.metrics_token) < 16:
            raise BadSetting(f"{self.env_name('metrics_token')} must be at least 16 characters")
        for name in (
            "send_rate_per_s",
            "send_bytes_per_s",
            "channel_bytes_per_s",
            "read_rate_per_s",
            "sign_in_rate_per_s",
        ):
            rate = getattr(self, name)
            if not (math.isfinite(rate) and 0 <= rate <= 1e12):
                raise BadSetting(f"{self.env_name(name)} must be 0 (off) or a rate")
        if not (math.isfinite(self.gc_thaw_s) and self.gc_thaw_s >= 0):
            raise BadSetting(f"{self.env_name('gc_thaw_s')} must be 0 (off) or seconds")
        self._positive(
            "token_max_lifetime_s",
            "rate_limit_skip_s",
            "max_history",
            "max_history_bytes",
            "max_body_bytes",
            "ws_auth_timeout_s",
            "ws_first_frame_bytes",
            "ws_max_unauthenticated",
            "ws_max_unauthenticated_per_address",
            "ws_max_per_user",
            "ws_max_sockets",
            "workers",
            "worker_healthcheck_s",
        )

    @property
    def extra_hosts(self) -> list[str]:
        return [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]


def parse_fault_spec(spec: str) -> dict[str, float]:
    """`realtime=0.5,permanent=1.0` -> {"fault_realtime": 0.5, "fault_permanent": 1.0}."""
    faults: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        tier, sep, raw = part.partition("=")
        if not sep or tier not in ("realtime", "permanent"):
            raise BadSetting(f"--fault takes realtime=P,permanent=P, got {part!r}")
        try:
            faults[f"fault_{tier}"] = float(raw)
        except ValueError:
            raise BadSetting(f"--fault {tier}={raw!r} is not a probability") from None
    return faults


_UNSET = object()
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(name: str, raw: str, annotation: Any) -> object:
    """``raw`` as the field's type. Empty means unset, except where the field may be None (an
    empty `DUALWRITE_TOKEN_SECRET` must be refused, never read as "no secret")."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    if raw == "" and type(None) not in kinds:
        return _UNSET
    if bool in kinds:
        if raw.lower() not in _TRUE + _FALSE:
            raise BadSetting(f"{name}={raw!r}: use one of {', '.join(_TRUE + _FALSE)}")
        return raw.lower() in _TRUE
    try:
        if int in kinds:
            return int(raw)
        if float in kinds:
            return float(raw)
    except ValueError:
        raise BadSetting(f"{name}={raw!r} is not a number") from None
    return raw
