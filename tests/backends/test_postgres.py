"""PostgreSQL-specific behaviour: bytewise id order under any collation, schema upgrades, the
history index, and TCP settings that give up on a server that stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import PoolTimeout

from dualwrite import Settings, open_dualwrite
from dualwrite._calls import bounded
from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.backends.permanent.postgres import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    PostgresPermanentStore,
    SchemaMissing,
)
from dualwrite.cli import main
from dualwrite.clock import SystemClock
from dualwrite.errors import BackendTimeout
from dualwrite.ids import time_prefix
from dualwrite.model import ChannelRef, PermanentWrite, history_cursor
from tests.conftest import _CREATED_SCHEMAS, unique
from tests.support.wait import until

pytestmark = pytest.mark.postgres

# Push-id characters whose order differs between bytes and a natural-language collation:
# bytewise '-' < '0' < 'A' < '_' < 'a', while ICU puts punctuation first and 'A' next to 'a'.
SUFFIXES = ["-zzzzzzzzzzz", "0zzzzzzzzzzz", "Azzzzzzzzzzz", "_zzzzzzzzzzz", "azzzzzzzzzzz"]


def server_url() -> str:
    url = os.environ.get("DUALWRITE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DUALWRITE_TEST_POSTGRES_URL is not set")
    return url


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(scope="module")
def icu_database() -> Iterator[str]:
    """A database of its own whose default collation is ICU en-US, not C; dropped afterwards."""
    url = server_url()
    name = f"dw_icu_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' "
                "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            ).format(sql.Identifier(name))
        )
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def new_store(
    url: str,
    schema: str | None = None,
    *,
    migrate: bool = True,
    timeout_s: float = 5.0,
    query: str = "",
) -> PostgresPermanentStore:
    """A store (not connected yet) on its own schema of the database at ``url``."""
    schema = schema or unique("test_")
    _CREATED_SCHEMAS.append(schema)  # dropped at the end if it is in the test database
    query = f"?schema={schema}" + ("&migrate=1" if migrate else "") + query
    store = create_permanent_store(url + query, BackendContext(call_timeout_s=timeout_s))
    assert isinstance(store, PostgresPermanentStore)
    return store


async def open_store(url: str, **options: Any) -> PostgresPermanentStore:
    store = new_store(url, **options)
    await store.connect()
    return store


@pytest.fixture
async def icu_store(icu_database: str) -> AsyncIterator[PostgresPermanentStore]:
    store = await open_store(icu_database)
    yield store
    await store.close()


def one_batch(channel: ChannelRef) -> list[PermanentWrite]:
    """First attempts (the store's own time) with ids alike but for one character."""
    prefix = time_prefix(1_700_000_000_000)
    return [
        PermanentWrite(channel, prefix + suffix, "u1", "Ada", f"m{i}", 0)
        for i, suffix in enumerate(SUFFIXES)
    ]


def icu_order(url: str, ids: list[str]) -> list[str]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT array_agg(x ORDER BY x DESC) FROM unnest(%s::text[]) x", (ids,))
        result = row.fetchone()
    assert result is not None
    return list(result[0])


async def test_history_pages_ties_in_bytewise_id_order_under_an_icu_collation(
    icu_database: str, icu_store: PostgresPermanentStore
) -> None:
    channel = ChannelRef(unique("ws"), unique("ch"))
    batch = one_batch(channel)
    ids = [w.message_id for w in batch]
    expected = sorted(ids, reverse=True)
    assert icu_order(icu_database, ids) != expected, "the collation must disagree with bytes"

    await icu_store.save_many(batch)  # one statement: one now() for the whole batch
    seen: list[str] = []
    times: set[int] = set()
    before: str | None = None
    while True:
        page = await icu_store.history(channel, before, 2)
        seen += [m.message_id for m in page.messages]
        times |= {m.timestamp for m in page.messages}
        if page.next_before is None:
            break
        before = page.next_before
    assert len(times) == 1, "the batch shares one timestamp: ids alone order it"
    assert seen == expected


async def test_merged_history_shows_each_tied_message_once_under_an_icu_collation(
    icu_database: str, tmp_path: Path
) -> None:
    """The issue's report: 5 rows of one batch, pages of 2 gave 6 items, one of them twice."""
    channel = ChannelRef(unique("ws"), unique("ch"))
    batch = one_batch(channel)
    store = new_store(icu_database)
    settings = Settings(queue_path=str(tmp_path / "queue.db"))
    clock = SystemClock()
    async with open_dualwrite(
        settings,
        realtime=create_realtime_tier("memory://", BackendContext(clock)),
        store=store,
        clock=clock,
        background=False,
    ) as dw:
        await store.save_many(batch)
        seen: list[str] = []
        before: str | None = None
        for _ in range(10):
            page = await dw.history(channel.workspace_id, channel.channel_id, before, 2)
            seen += [m.message_id for m in page.messages]
            if page.next_before is None:
                break
            before = page.next_before
    assert seen == sorted((w.message_id for w in batch), reverse=True)


# What `dualwrite migrate` created before schema version 2, as databases in use still have it.
V1_SQL = """
    CREATE TABLE IF NOT EXISTS {schema}.messages (
        workspace_id text NOT NULL,
        channel_id   text NOT NULL,
        message_id   text NOT NULL,
        user_id      text NOT NULL,
        user_name    text NOT NULL,
        text         text NOT NULL,
        "timestamp"  timestamptz NOT NULL,
        created_at   timestamptz NOT NULL,
        PRIMARY KEY (workspace_id, channel_id, message_id)
    );
    CREATE INDEX IF NOT EXISTS messages_history
        ON {schema}.messages (workspace_id, channel_id, "timestamp" DESC, message_id DESC);
    """


def test_migrations_are_append_only() -> None:
    assert _MIGRATIONS[0] == V1_SQL, "a released step must stay as databases ran it"
    assert len(_MIGRATIONS) == SCHEMA_VERSION == 3


def key_collations(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    """The collation of each text key column, and of each index's text columns."""
    rows = conn.execute(
        "SELECT a.attname, c.collname FROM pg_attribute a JOIN pg_collation c "
        "ON c.oid = a.attcollation WHERE a.attrelid = to_regclass(%s) "
        "AND a.attname IN ('workspace_id', 'channel_id', 'message_id')",
        (f'"{schema}".messages',),
    ).fetchall()
    found = {name: collation for name, collation in rows}
    indexes = conn.execute(
        "SELECT i.indexrelid::regclass::text, k.n, c.collname FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indcollation) WITH ORDINALITY AS k(coll, n) "
        "JOIN pg_collation c ON c.oid = k.coll WHERE i.indrelid = to_regclass(%s)",
        (f'"{schema}".messages',),
    ).fetchall()
    for index, position, collation in indexes:
        found[f"{index.rsplit('.', 1)[-1]}[{position}]"] = collation
    return found


def test_migrate_upgrades_a_version_1_schema_keeping_its_rows(
    icu_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema = unique("test_")
    channel = ChannelRef(unique("ws"), unique("ch"))
    ids = [time_prefix(1_700_000_000_000) + suffix for suffix in SUFFIXES]
    with psycopg.connect(icu_database, autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(V1_SQL).format(schema=sql.Identifier(schema)))
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS 'dualwrite schema v1'").format(sql.Identifier(schema))
        )
        for message_id in ids:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.messages VALUES (%s, %s, %s, 'u1', 'Ada', 'old', "
                    "timestamptz 'epoch' + interval '1700000000 seconds', now())"
                ).format(sql.Identifier(schema)),
                (channel.workspace_id, channel.channel_id, message_id),
            )
        before = key_collations(conn, schema)
    assert set(before.values()) == {"default"}, before

    async def refused() -> None:
        store = new_store(icu_database, schema, migrate=False)
        with pytest.raises(SchemaMissing, match="dualwrite migrate"):
            await store.connect()

    asyncio.run(refused())

    monkeypatch.setenv("DUALWRITE_STORE_URL", f"{icu_database}?schema={schema}")
    monkeypatch.setenv("DUALWRITE_QUEUE_PATH", str(tmp_path / "queue.db"))
    assert main(["migrate"]) == 0
    assert main(["migrate"]) == 0  # idempotent
    capsys.readouterr()

    with psycopg.connect(icu_database) as conn:
        after = key_collations(conn, schema)
        assert set(after) == set(before)
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.messages").format(sql.Identifier(schema))
        ).fetchone()
    assert set(after.values()) == {"C"}, after
    assert count == (len(ids),)

    async def upgraded() -> None:
        store = new_store(icu_database, schema, migrate=False)
        await store.connect()
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            assert await store.migrate() == SCHEMA_VERSION
            kept = await store.get(channel, ids[0])
            assert kept is not None and kept.text == "old"
            assert kept.timestamp == 1_700_000_000_000
            page = await store.history(channel, None, 10)
            assert [m.message_id for m in page.messages] == sorted(ids, reverse=True)
        finally:
            await store.close()

    asyncio.run(upgraded())


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.parametrize("collation", ["database", "icu"])
async def test_the_history_index_serves_the_page_in_order_without_a_sort(
    collation: str, request: pytest.FixtureRequest
) -> None:
    url = server_url() if collation == "database" else request.getfixturevalue("icu_database")
    store = await open_store(url)
    try:
        channel = ChannelRef(unique("ws"), unique("ch"))
        start = 1_600_000_000_000
        for ch in [channel] + [ChannelRef(channel.workspace_id, f"other{i}") for i in range(4)]:
            batch = [
                PermanentWrite(ch, f"{time_prefix(start + i // 3)}{i:012d}", "u1", "A", "x", start)
                for i in range(1500)
            ]
            # Retries keep their send time: three messages per millisecond, ties included.
            await store.save_many(
                [replace(w, sent_at=start + i // 3).as_retry() for i, w in enumerate(batch)]
            )
        async with store._p.connection() as conn:
            await conn.execute(store._q("ANALYZE {schema}.messages"))
            for before in (
                None,
                history_cursor(start + 200, f"{time_prefix(start + 200)}{600:012d}"),
            ):
                query, params = store._history_query(channel, before, 50)
                cur = await conn.execute(b"EXPLAIN (FORMAT JSON) " + query, params)
                row = await cur.fetchone()
                assert row is not None
                nodes = list(plan_nodes(row[0][0]["Plan"]))
                kinds = [node["Node Type"] for node in nodes]
                assert not any("Sort" in kind for kind in kinds), kinds
                scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
                assert [n["Index Name"] for n in scans] == ["messages_history"], kinds
    finally:
        await store.close()


def tcp_options(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """What the kernel applies to this connection's socket, on the client's side."""
    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
@pytest.mark.parametrize(
    ("timeout_s", "query", "expected"),
    [
        (5.0, "", {"idle": 5, "interval": 5, "count": 3, "user_timeout": 20_000}),
        (0.5, "", {"idle": 1, "interval": 1, "count": 3, "user_timeout": 4_000}),
        # Settings in the URL win over the derived ones.
        (
            5.0,
            "&keepalives_idle=30",
            {"idle": 30, "interval": 5, "count": 3, "user_timeout": 20_000},
        ),
    ],
)
async def test_connections_give_up_on_a_silent_server_within_a_few_call_bounds(
    timeout_s: float, query: str, expected: dict[str, int]
) -> None:
    url = server_url()
    host = urlsplit(url).hostname
    if not host or host.startswith("/"):
        pytest.skip("a Unix socket has no TCP settings")
    store = await open_store(url, timeout_s=timeout_s, query=query)
    try:
        async with store._p.connection() as conn:
            options = tcp_options(conn)
            params = conn.info.get_parameters()
    finally:
        await store.close()
    assert options == {
        "keepalives": 1,
        "keepalives_idle": expected["idle"],
        "keepalives_interval": expected["interval"],
        "keepalives_count": expected["count"],
        "tcp_user_timeout": expected["user_timeout"],
    }
    # libpq took them as connection parameters (not the server's tcp_keepalives_* settings).
    assert params["keepalives_idle"] == str(expected["idle"])
    assert params["tcp_user_timeout"] == str(expected["user_timeout"])


class StallingProxy:
    """A TCP proxy that, once stalled, keeps its connections open and forwards nothing, as a
    proxy whose server hangs. Its kernel still acknowledges, so TCP keepalives see no fault."""

    def __init__(self, url: str) -> None:
        self._url = urlsplit(url)
        self.stalled = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Start; return ``url`` with its address replaced by the proxy's."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._url.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            target = (self._url.hostname or "127.0.0.1", self._url.port or 5432)
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if not self.stalled:
                        dst.write(data)
                        await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._handlers.discard(task)


async def test_calls_through_a_proxy_that_stops_forwarding_fail_within_their_bound() -> None:
    proxy = StallingProxy(server_url())
    store = await open_store(await proxy.start(), timeout_s=0.5)
    try:
        channel = ChannelRef(unique("ws"), unique("ch"))
        first, second = one_batch(channel)[:2]
        await store.save(first)
        proxy.stalled = True
        calls: list[Coroutine[Any, Any, object]] = [
            store.save(second),
            store.get(channel, first.message_id),
            store.history(channel, None, 10),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendTimeout):
                await bounded(call, 0.5, "permanent store")
            # psycopg alone answered the cancellation after cancelling the query in the server
            # and waiting for its connection (5 s each): 10.5 s.
            assert time.monotonic() - started < 1.5
        proxy.stalled = False

        async def saved() -> bool:
            with contextlib.suppress(BackendTimeout, PoolTimeout, psycopg.OperationalError):
                await bounded(store.save(second), 0.5, "permanent store")
                return True
            return False

        await until(saved)
        assert await store.get(channel, second.message_id) is not None
    finally:
        started = time.monotonic()
        await store.close()
        closing_s = time.monotonic() - started
        await proxy.close()
    assert closing_s < 2


@pytest.mark.parametrize("idle_s", [0.0, 1.5])
async def test_a_call_on_a_connection_lost_since_it_last_answered_runs_on_another(
    idle_s: float,
) -> None:
    # A restarted server (or a proxy that dropped the connection) leaves pooled connections
    # lost: the next call runs on another at once, within its bound, whether or not they
    # have been idle for a while.
    store = await open_store(server_url(), timeout_s=2.0)
    try:
        channel = ChannelRef(unique("ws"), unique("ch"))
        first, second = one_batch(channel)[:2]
        # Several pooled connections, all to be lost.
        await asyncio.gather(*(store.get_many(channel, [first.message_id]) for _ in range(6)))
        await store.save_many([first])
        await asyncio.sleep(idle_s)
        with psycopg.connect(server_url(), autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{store._schema_name}%",),
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        started = time.monotonic()
        await store.save_many([second])
        assert time.monotonic() - started < 1.0
        saved = await store.get_many(channel, [first.message_id, second.message_id])
        assert sorted(saved) == sorted([first.message_id, second.message_id])
    finally:
        await store.close()
