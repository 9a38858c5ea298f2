"""Configuration: one dataclass, read from `DUALWRITE_*` environment variables or given."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dualwrite.errors import DualWriteError


class BadSetting(DualWriteError, ValueError):
    """A configuration value could not be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything `open_dualwrite` needs. Defaults run with no server at all."""

    realtime_url: str = "memory://"
    """`memory://`, `redis://host:port/db`, `firebase-rtdb://...`"""
    store_url: str = "sqlite:///dualwrite-data/messages.db"
    """`sqlite:///path`, `postgresql://...`, `firestore://PROJECT`, `memory://`"""
    queue_path: str = "dualwrite-data/retry-queue.db"
    """Local SQLite file of the durable retry queue (one per process or host)."""
    realtime_timeout_s: float = 2.0
    permanent_timeout_s: float = 5.0
    max_text_chars: int = 40_000
    retry_base_s: float = 1.0
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
    fault_realtime: float = 0.0
    """Development only: the probability that a realtime call fails on purpose."""
    fault_permanent: float = 0.0
    """Development only: the probability that a permanent-store call fails on purpose."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `DUALWRITE_<FIELD>` variables (and `SENTRY_DSN`), then ``overrides``.

        ``overrides`` whose value is None are ignored, so CLI flags can be passed as they are.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = "SENTRY_DSN" if f.name == "sentry_dsn" else f"DUALWRITE_{f.name.upper()}"
            if name in env:
                values[f.name] = _parse(name, env[name], f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        settings.check()
        return settings

    def check(self) -> None:
        for name in (
            "realtime_timeout_s",
            "permanent_timeout_s",
            "retry_base_s",
            "retry_cap_s",
            "retry_poll_s",
            "sweep_interval_s",
            "reconcile_interval_s",
            "reconcile_grace_s",
        ):
            if getattr(self, name) <= 0:
                raise BadSetting(f"{name} must be positive")
        for name in ("fault_realtime", "fault_permanent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BadSetting(f"{name} must be a probability from 0 to 1")
        if self.group_max_batch < 1 or self.group_max_in_flight < 1 or self.group_max_wait_ms < 0:
            raise BadSetting("group commit needs max_batch >= 1, max_in_flight >= 1, wait >= 0")
        if self.max_text_chars < 1:
            raise BadSetting("max_text_chars must be at least 1")


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


def _parse(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise BadSetting(f"{name}={raw!r} is not a number") from None
    return raw or default
