"""Shared fixtures. Backends are listed once here; every contract suite runs over all of them.

Service-backed backends are marked (``redis``, ``redis_cluster``, ``postgres``, ``firebase``) and
skipped only when their URL variable is unset; `.ci/run` sets them all, so CI runs everything.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.clock import ManualClock, SystemClock
from dualwrite.faults import Faults, FaultyPermanentStore, FaultyRealtimeTier
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.runtime import open_dualwrite
from dualwrite.service import DualWrite
from dualwrite.settings import Settings
from tests.firebase.servers import firebase_servers


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        pytest.skip(f"{variable} is not set")
    return url


def realtime_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        return f"{_service_url('DUALWRITE_TEST_REDIS_URL')}?prefix={unique()}:"
    if kind == "redis-cluster":
        return f"{_service_url('DUALWRITE_TEST_REDIS_CLUSTER_URL')}?prefix={unique()}:"
    if kind in ("firebase-rest", "firebase-server"):
        return firebase_servers().realtime_url(kind)
    raise AssertionError(kind)


# What each local Realtime Database stand-in can honestly serve (README: Running on Firebase).
REALTIME_LACKS: dict[str, set[str]] = {
    "firebase-server": {"listen", "transaction"},
}


def needs(kind: str, capability: str) -> None:
    if capability in REALTIME_LACKS.get(kind, set()):
        pytest.skip(f"{kind} has no {capability} (REST streaming/ETags); firebase-rest covers it")


# What the local Firestore stand-in cannot serve (Google's emulator and Firestore itself can):
# @firestore-emulator/server answers a collection-group query as if it were a query of one
# top-level collection (nothing found), and has no ListDocuments.
STORE_LACKS: dict[str, set[str]] = {
    "firestore": {"find", "list_documents"},
}


def needs_store(kind: str, capability: str) -> None:
    """Skip where the store under test is a stand-in that cannot serve ``capability``."""
    if capability in STORE_LACKS.get(kind, set()) and firebase_servers().firestore_standin:
        pytest.skip(f"the {kind} stand-in has no {capability} (README)")


def store_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/messages.db"
    if kind == "firestore":
        firebase_servers()
        return "firestore://dualwrite-test"
    if kind == "postgres":
        schema = unique("test_")
        _CREATED_SCHEMAS.append(schema)
        return f"{_service_url('DUALWRITE_TEST_POSTGRES_URL')}?schema={schema}&migrate=1"
    raise AssertionError(kind)


_CREATED_SCHEMAS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _drop_test_schemas() -> Iterator[None]:
    """Each test gets its own PostgreSQL schema; drop them all when the run ends."""
    yield
    url = os.environ.get("DUALWRITE_TEST_POSTGRES_URL")
    if not url or not _CREATED_SCHEMAS:
        return
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        for schema in _CREATED_SCHEMAS:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


REALTIME_KINDS = [
    pytest.param("memory", id="rt-memory"),
    pytest.param("redis", id="rt-redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", id="rt-redis-cluster", marks=pytest.mark.redis_cluster),
    pytest.param("firebase-rest", id="rt-firebase-rest", marks=pytest.mark.firebase),
    pytest.param("firebase-server", id="rt-firebase-server", marks=pytest.mark.firebase),
]
STORE_KINDS = [
    pytest.param("memory", id="store-memory"),
    pytest.param("sqlite", id="store-sqlite"),
    pytest.param("postgres", id="store-postgres", marks=pytest.mark.postgres),
    pytest.param("firestore", id="store-firestore", marks=pytest.mark.firebase),
]
# The pairs a deployment runs: the embedded default and each production pair.
PAIRS = [
    pytest.param(("memory", "sqlite"), id="embedded"),
    pytest.param(
        ("redis", "postgres"), id="redis+postgres", marks=[pytest.mark.redis, pytest.mark.postgres]
    ),
    pytest.param(
        ("redis-cluster", "postgres"),
        id="redis-cluster+postgres",
        marks=[pytest.mark.redis_cluster, pytest.mark.postgres],
    ),
]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SystemClock().now_ms())


@pytest.fixture(params=REALTIME_KINDS)
def realtime_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def realtime(
    realtime_kind: str, clock: ManualClock, tmp_path: Path
) -> AsyncIterator[RealtimeTier]:
    tier = create_realtime_tier(realtime_url(realtime_kind, tmp_path), BackendContext(clock))
    await tier.connect()
    yield tier
    await tier.close()


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(
    store_kind: str, clock: ManualClock, tmp_path: Path
) -> AsyncIterator[PermanentStore]:
    permanent = create_permanent_store(store_url(store_kind, tmp_path), BackendContext(clock))
    await permanent.connect()
    yield permanent
    await permanent.close()


@dataclass
class Harness:
    """A running dualwrite whose two backends fail on demand."""

    dw: DualWrite
    realtime_faults: Faults
    store_faults: Faults
    clock: ManualClock
    realtime: FaultyRealtimeTier
    store: FaultyPermanentStore


@pytest.fixture(params=PAIRS)
async def harness(
    request: pytest.FixtureRequest, clock: ManualClock, tmp_path: Path
) -> AsyncIterator[Harness]:
    realtime_kind, store_kind = request.param
    context = BackendContext(clock)
    realtime_faults, store_faults = Faults(), Faults()
    realtime = FaultyRealtimeTier(
        create_realtime_tier(realtime_url(realtime_kind, tmp_path), context), realtime_faults
    )
    store = FaultyPermanentStore(
        create_permanent_store(store_url(store_kind, tmp_path), context), store_faults
    )
    settings = Settings(
        queue_path=str(tmp_path / "queue.db"),
        realtime_timeout_s=0.5,
        permanent_timeout_s=0.5,
    )
    async with open_dualwrite(
        settings, realtime=realtime, store=store, clock=clock, background=False
    ) as dw:
        yield Harness(dw, realtime_faults, store_faults, clock, realtime, store)
