"""Configuration: two dataclasses, read from environment variables or given.

`Settings` is what `open_dualwrite` needs; `ServerSettings` is what `dualwrite serve` adds on
top. Every default is written here once: the classes that receive these values take no defaults
of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

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
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = cls._ENV_NAMES.get(f.name, f"{cls._ENV_PREFIX}{f.name.upper()}")
            if name in env:
                values[f.name] = _parse(name, env[name], str(f.type))
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)  # type: ignore[type-var]
        settings.check()
        return settings

    def check(self) -> None:
        """Raise `BadSetting` for a value that cannot be used."""


def _positive(settings: object, *names: str) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise BadSetting(f"{name} must be positive")


@dataclass(frozen=True)
class Settings(_FromEnv):
    """Everything `open_dualwrite` needs. Defaults run with no server at all."""

    _ENV_NAMES: ClassVar[Mapping[str, str]] = {"sentry_dsn": "SENTRY_DSN"}

    realtime_url: str = "memory://"
    """`memory://`, `redis://host:port/db`, `firebase-rtdb://...`"""
    store_url: str = "sqlite:///dualwrite-data/messages.db"
    """`sqlite:///path`, `postgresql://...`, `firestore://PROJECT`, `memory://`"""
    queue_path: str = "dualwrite-data/retry-queue.db"
    """Local SQLite file of the durable retry queue (one per process or host)."""
    realtime_timeout_s: float = 2.0
    """Bound on one realtime-tier call; a send whose realtime write takes longer fails."""
    permanent_timeout_s: float = 5.0
    """Bound on one permanent-store call; a save that takes longer is queued."""
    max_text_chars: int = 40_000
    retry_base_s: float = 1.0
    """Backoff of the retry queue: attempt n waits up to min(cap, base * 2**n)."""
    retry_cap_s: float = 300.0
    retry_poll_s: float = 1.0
    sweep_interval_s: float = 60.0
    reconcile_interval_s: float = 60.0
    reconcile_grace_s: float = 30.0
    """The reconciler leaves messages younger than this to their own send."""
    sentry_dsn: str | None = None
    migrate_on_start: bool = False
    """Create or upgrade the permanent store's schema on connect (else: `dualwrite migrate`)."""
    group_commit: bool = True
    """Coalesce concurrent permanent writes into one round trip (`dualwrite.group_commit`)."""
    group_max_batch: int = 256
    group_max_in_flight: int = 4
    group_max_wait_ms: float = 0.0
    """Hold a batch this long for more writes (0: only what queued while the last was out)."""
    live_buffer: int = 1000
    """Live entries one listener (socket) may let wait; past that it is closed (1013) and
    resumes after its last cursor."""
    live_replay_page: int = 500
    """Entries a resume reads per round trip, until caught up."""
    live_replay_window_s: float = 60.0
    """A resume by message id (and any resume on Firebase, whose ids follow creation order,
    not write order) replays this much before its point; clients drop ids they have."""
    live_streams_per_read: int = 1000
    """Channels one live reader follows per blocking read (Redis: streams per XREAD)."""
    fault_realtime: float = 0.0
    """Development only: the probability that a realtime call fails on purpose."""
    fault_permanent: float = 0.0
    """Development only: the probability that a permanent-store call fails on purpose."""

    def check(self) -> None:
        _positive(
            self,
            "realtime_timeout_s",
            "permanent_timeout_s",
            "retry_base_s",
            "retry_cap_s",
            "retry_poll_s",
            "sweep_interval_s",
            "reconcile_interval_s",
            "reconcile_grace_s",
            "live_buffer",
            "live_replay_page",
            "live_streams_per_read",
        )
        if self.live_replay_window_s < 0:
            raise BadSetting("live_replay_window_s must be 0 or more")
        for name in ("fault_realtime", "fault_permanent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BadSetting(f"{name} must be a probability from 0 to 1")
        if self.group_max_batch < 1 or self.group_max_in_flight < 1 or self.group_max_wait_ms < 0:
            raise BadSetting("group commit needs max_batch >= 1, max_in_flight >= 1, wait >= 0")
        if self.max_text_chars < 1:
            raise BadSetting("max_text_chars must be at least 1")


@dataclass(frozen=True)
class ServerSettings(_FromEnv):
    """What `dualwrite serve` adds: sign-in, limits of the HTTP API, the WebSocket."""

    token_secret: str | None = None
    """HMAC secret of bearer tokens (32+ characters); unset: a random one per process."""
    dev_sign_in: bool | None = None
    """Serve `POST /api/dev/token` (the page's sign-in form); None: on without a secret."""
    firebase_project: str | None = None
    """Also accept Firebase ID tokens of this project (uid, name, `workspaceId` claim)."""
    send_rate_per_s: float = 10.0
    """Per-user sends a second (token bucket, per process), bursts of twice that; 0: off."""
    max_history: int = 200
    """The largest page `GET .../messages?limit=` serves."""
    max_body_bytes: int = 256 * 1024
    ws_auth_timeout_s: float = 5.0
    """A socket that has not sent its token by then is closed."""

    def check(self) -> None:
        if self.token_secret is not None and len(self.token_secret) < 32:
            raise BadSetting("DUALWRITE_TOKEN_SECRET must be at least 32 characters")
        if self.send_rate_per_s < 0:
            raise BadSetting("send_rate_per_s must be 0 (off) or positive")
        _positive(self, "max_history", "max_body_bytes", "ws_auth_timeout_s")

    @property
    def send_burst(self) -> int:
        return max(1, int(self.send_rate_per_s * 2))

    @property
    def dev_sign_in_enabled(self) -> bool:
        return self.dev_sign_in if self.dev_sign_in is not None else self.token_secret is None


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit to print."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


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


def _parse(name: str, raw: str, annotation: str) -> object:
    kind = annotation.partition(" ")[0]
    if kind == "bool":
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise BadSetting(f"{name}={raw!r} is not a number") from None
    return raw or None
