"""Backends chosen by URL scheme. Drivers are imported only when their scheme is used.

To add a backend, write one module with a ``create(url, context)`` function returning an object
that implements `dualwrite.ports.RealtimeTier` or `dualwrite.ports.PermanentStore`, add its
scheme below, and run the contract suites in ``tests/backends`` against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dualwrite.clock import Clock, SystemClock
from dualwrite.errors import UnknownBackend

if TYPE_CHECKING:
    from dualwrite.ports import PermanentStore, RealtimeTier


@dataclass(frozen=True)
class BackendContext:
    """What every backend may need besides its URL."""

    clock: Clock = field(default_factory=SystemClock)
    call_timeout_s: float = 5.0
    """Upper bound for one backend call; drivers that take a timeout are given this one."""
    migrate_on_start: bool = False
    """Stores with a schema (PostgreSQL) create or upgrade it when they connect."""
    live_streams_per_read: int = 1000
    """Channels one live reader follows in one blocking read (Redis: streams per XREAD)."""
    live_replay_window_ms: int = 60_000
    """Firebase: a resume replays this much before its cursor (ids follow creation order)."""


REALTIME_BACKENDS: dict[str, str] = {
    "memory": "dualwrite.backends.realtime.memory",
    "redis": "dualwrite.backends.realtime.redis",
    "rediss": "dualwrite.backends.realtime.redis",
    "firebase-rtdb": "dualwrite.backends.realtime.firebase",
}

PERMANENT_BACKENDS: dict[str, str] = {
    "memory": "dualwrite.backends.permanent.memory",
    "sqlite": "dualwrite.backends.permanent.sqlite",
    "postgresql": "dualwrite.backends.permanent.postgres",
    "postgres": "dualwrite.backends.permanent.postgres",
    "firestore": "dualwrite.backends.permanent.firestore",
}


def _module_for(url: str, table: dict[str, str], kind: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in table:
        known = ", ".join(f"{s}://" for s in sorted(table))
        raise UnknownBackend(f"no {kind} backend for {url!r}; known schemes: {known}")
    return table[scheme]


def create_realtime_tier(url: str, context: BackendContext | None = None) -> RealtimeTier:
    """Build (without connecting) the realtime tier that ``url`` names."""
    module = importlib.import_module(_module_for(url, REALTIME_BACKENDS, "realtime"))
    # Each module's `create` is annotated to return the Protocol, so mypy checks the backend.
    factory: Callable[[str, BackendContext], RealtimeTier] = module.create
    return factory(url, context or BackendContext())


def create_permanent_store(url: str, context: BackendContext | None = None) -> PermanentStore:
    """Build (without connecting) the permanent store that ``url`` names."""
    module = importlib.import_module(_module_for(url, PERMANENT_BACKENDS, "permanent store"))
    factory: Callable[[str, BackendContext], PermanentStore] = module.create
    return factory(url, context or BackendContext())
