"""Backends chosen by URL scheme. Drivers are imported only when their scheme is used.

To add a backend, write one module with a ``create(url, context)`` function returning an object
that implements `dualwrite.ports.RealtimeTier` or `dualwrite.ports.PermanentStore`, add its
scheme below, and run the contract suites in ``tests/backends`` against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dualwrite.clock import Clock, SystemClock
from dualwrite.errors import BadSetting, UnknownBackend
from dualwrite.settings import Settings

if TYPE_CHECKING:
    from dualwrite.ports import PermanentStore, RealtimeTier


@dataclass(frozen=True)
class BackendContext:
    """What every backend may need besides its URL."""

    clock: Clock = field(default_factory=SystemClock)
    call_timeout_s: float = Settings.permanent_timeout_s
    """Upper bound for one permanent-store call; drivers that take a timeout are given it."""
    realtime_timeout_s: float = Settings.realtime_timeout_s
    """Upper bound for one realtime-tier call, given to its driver (socket, HTTP timeouts)."""
    realtime_threads: int = Settings.realtime_threads
    """Worker threads of a realtime driver that blocks (firebase-admin): its own pool."""
    migrate_on_start: bool = False
    """Stores with a schema (PostgreSQL) create or upgrade it when they connect."""
    memory_max_bytes: int = Settings.memory_max_bytes
    """The `memory://` realtime tier refuses writes past this many bytes held."""
    memory_max_claims: int = Settings.memory_max_claims
    """The `memory://` realtime tier refuses idempotency keys past this many held."""
    memory_max_buckets: int = Settings.memory_max_buckets
    """The `memory://` realtime tier keeps at most this many rate-limit buckets."""
    live_streams_per_read: int = Settings.live_streams_per_read
    """Channels one live reader follows in one blocking read (Redis: streams per XREAD)."""
    live_replay_window_ms: int = int(Settings.live_replay_window_s * 1000)
    """Firebase: a resume replays this much before its cursor (ids follow creation order)."""

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock | None = None) -> BackendContext:
        """What ``settings`` say each backend needs (the one place that maps them)."""
        return cls(
            clock=clock or SystemClock(),
            call_timeout_s=settings.permanent_timeout_s,
            realtime_timeout_s=settings.realtime_timeout_s,
            realtime_threads=settings.realtime_threads,
            migrate_on_start=settings.migrate_on_start,
            memory_max_bytes=settings.memory_max_bytes,
            memory_max_claims=settings.memory_max_claims,
            memory_max_buckets=settings.memory_max_buckets,
            live_streams_per_read=settings.live_streams_per_read,
            live_replay_window_ms=int(settings.live_replay_window_s * 1000),
        )


# The extra (pyproject.toml) that brings each backend's driver.
_EXTRAS = {
    "redis": "redis",
    "postgres": "postgres",
    "firebase": "firebase",
    "firestore": "firebase",
}

REALTIME_BACKENDS: dict[str, str] = {
    "memory": "dualwrite.backends.realtime.memory",
    "redis": "dualwrite.backends.realtime.redis",
    "rediss": "dualwrite.backends.realtime.redis",
    "redis+cluster": "dualwrite.backends.realtime.redis",
    "rediss+cluster": "dualwrite.backends.realtime.redis",
    "firebase-rtdb": "dualwrite.backends.realtime.firebase",
}

PERMANENT_BACKENDS: dict[str, str] = {
    "memory": "dualwrite.backends.permanent.memory",
    "sqlite": "dualwrite.backends.permanent.sqlite",
    "postgresql": "dualwrite.backends.permanent.postgres",
    "postgres": "dualwrite.backends.permanent.postgres",
    "firestore": "dualwrite.backends.permanent.firestore",
}


def _module_for(url: str, table: dict[str, str], kind: str) -> Any:
    scheme = urlsplit(url).scheme
    if scheme not in table:
        known = ", ".join(f"{s}://" for s in sorted(table))
        raise UnknownBackend(f"no {kind} backend for {url!r}; known schemes: {known}")
    try:
        return importlib.import_module(table[scheme])
    except ImportError as missing:
        extra = _EXTRAS.get(table[scheme].rpartition(".")[2], "all")
        raise BadSetting(
            f"{scheme}:// needs the {extra} extra: pip install 'dualwrite[{extra}]' "
            f"({missing.name} is missing)"
        ) from None


def create_realtime_tier(url: str, context: BackendContext | None = None) -> RealtimeTier:
    """Build (without connecting) the realtime tier that ``url`` names."""
    module = _module_for(url, REALTIME_BACKENDS, "realtime")
    # Each module's `create` is annotated to return the Protocol, so mypy checks the backend.
    factory: Callable[[str, BackendContext], RealtimeTier] = module.create
    return factory(url, context or BackendContext())


def create_permanent_store(url: str, context: BackendContext | None = None) -> PermanentStore:
    """Build (without connecting) the permanent store that ``url`` names."""
    module = _module_for(url, PERMANENT_BACKENDS, "permanent store")
    factory: Callable[[str, BackendContext], PermanentStore] = module.create
    return factory(url, context or BackendContext())
