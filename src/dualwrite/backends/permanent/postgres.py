"""PostgreSQL permanent store (`postgresql://user@host:port/db?schema=dualwrite`), psycopg 3.

Times are `timestamptz` truncated to the millisecond, so they round-trip exactly as the
milliseconds the rest of dualwrite speaks, and history cursors compare exactly.
Create the schema with `dualwrite migrate` (or `DUALWRITE_MIGRATE_ON_START=1`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dualwrite.backends import BackendContext
from dualwrite.errors import BackendError, BackendUnavailable
from dualwrite.logs import one_line
from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    PermanentWrite,
    StoredMessage,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore
from dualwrite.redact import redact_url

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Connection = psycopg.AsyncConnection[Any]

# Append only: a database at version N runs the steps after its N-th, in one transaction.
_MIGRATIONS = [
    # Version 1: the messages table and the index serving history pages.
    """
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
    """,
    # Version 2: keys compare bytewise, as history cursors, the merge with the realtime tier and
    # the other stores do, whatever the database's collation (under en-US, ICU or libc, 'A'
    # sorts beside 'a' and '-' or '_' not by its byte: pages of tied messages repeated and
    # skipped some). No table rewrite (text stays text), but both indexes are rebuilt, holding
    # an exclusive lock on the table meanwhile: run it when a pause of writes is acceptable.
    """
    ALTER TABLE {schema}.messages
        ALTER COLUMN workspace_id TYPE text COLLATE "C",
        ALTER COLUMN channel_id TYPE text COLLATE "C",
        ALTER COLUMN message_id TYPE text COLLATE "C";
    """,
    # Version 3: channels created before they hold a message (the page's channel list).
    """
    CREATE TABLE IF NOT EXISTS {schema}.channels (
        workspace_id text COLLATE "C" NOT NULL,
        channel_id   text COLLATE "C" NOT NULL,
        created_at   timestamptz NOT NULL,
        PRIMARY KEY (workspace_id, channel_id)
    );
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)

# The channels holding messages, one index seek per channel (a loose index scan) rather than a
# scan of every message of the workspace; then those added without a message yet.
_CHANNELS = """
WITH RECURSIVE held(ch) AS (
    SELECT min(channel_id) FROM {schema}.messages WHERE workspace_id = %(ws)s
    UNION ALL
    SELECT (SELECT min(channel_id) FROM {schema}.messages
            WHERE workspace_id = %(ws)s AND channel_id > held.ch)
    FROM held WHERE held.ch IS NOT NULL
)
SELECT ch FROM held WHERE ch IS NOT NULL
UNION
SELECT channel_id FROM {schema}.channels WHERE workspace_id = %(ws)s
"""

_MS = "(extract(epoch FROM {col}) * 1000)::bigint"
_SELECT = (
    "SELECT workspace_id, channel_id, message_id, user_id, user_name, text, "
    + _MS.format(col='"timestamp"')
    + ", "
    + _MS.format(col="created_at")
    + " FROM {schema}.messages "
)
_NOW = "date_trunc('milliseconds', now())"
_FROM_MS = "(timestamptz 'epoch' + %s * interval '1 millisecond')"


_KEEPALIVE_PROBES = 3
_POOL_SIZE = 10
_ATTEMPTS_ON_LOST_CONNECTION = _POOL_SIZE + 1
"""A call that finds its connection lost runs again on another, up to this many times in all
(a restarted server leaves every pooled connection lost)."""


def tcp_settings(timeout_s: float) -> dict[str, int]:
    """libpq TCP parameters giving up on a server that stops answering in a few call bounds.

    Without them a pooled connection to a host that vanished (packets dropped, no reset) looks
    alive for the system's keepalive time, 2 hours by default, and a query sent on it waits for
    retransmissions for some 15 minutes more. Here an idle connection is probed after one call
    bound of silence, then every call bound, and dropped after 3 unanswered probes; data left
    unacknowledged as long is given up too (`tcp_user_timeout`, which on Linux also decides
    when unanswered probes end the connection, hence the same total). Keepalives are answered
    by whatever holds the TCP connection, so a proxy that stays up while forwarding nothing is
    caught by the callers' bounds, not by these.
    """
    probe_s = max(1, math.ceil(timeout_s))  # libpq takes whole seconds
    return {
        "keepalives": 1,
        "keepalives_idle": probe_s,
        "keepalives_interval": probe_s,
        "keepalives_count": _KEEPALIVE_PROBES,
        "tcp_user_timeout": probe_s * (1 + _KEEPALIVE_PROBES) * 1000,  # milliseconds
    }


class DatabaseUnreachable(BackendUnavailable):
    """PostgreSQL did not answer (down, cut off, or refusing connections)."""


class SchemaMissing(BackendError):
    """The database has no (or an older) dualwrite schema: run `dualwrite migrate`."""


class PostgresPermanentStore:
    def __init__(
        self, conninfo: str, schema: str, *, timeout_s: float, migrate_on_connect: bool
    ) -> None:
        self._conninfo = conninfo
        self._schema = sql.Identifier(schema)
        self._queries: dict[str, bytes] = {}
        self._schema_name = schema
        self._timeout_s = timeout_s
        self._migrate_on_connect = migrate_on_connect
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._schema_ready = False
        self._left_behind: set[asyncio.Task[Any]] = set()
        self._down: DatabaseUnreachable | None = None
        self._down_until = 0.0

    def _open_pool(self) -> AsyncConnectionPool[Connection]:
        # psycopg_pool warns at every failed reconnect attempt; dualwrite says once that the
        # database is down and reminds of it (logs.OutageLog). An application that set the
        # pool logger's level itself keeps its choice.
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            pool_log.setLevel(logging.ERROR)
        # The URL's own TCP settings, if it has any, win over the derived ones.
        given = conninfo_to_dict(self._conninfo)
        tcp = {k: v for k, v in tcp_settings(self._timeout_s).items() if k not in given}
        return AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=_POOL_SIZE,
            open=False,
            timeout=self._timeout_s,
            # psycopg_pool retries a failed connect with a backoff doubling up to this; past it,
            # the next call that waits starts afresh. Its default (300 s) let a database that
            # was back go unused for up to two minutes; this keeps the gap to a few seconds.
            reconnect_timeout=max(2.0, 2 * self._timeout_s),
            # No check before a connection is handed out: a call that finds its connection
            # lost runs again on another (`_on_connection`). The pool's check cost a round trip
            # per call, and after a restart it waited 1, 2, 4 s between the lost connections it
            # found, past the call's bound (the send then answered "pending").
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(self._timeout_s)),
                "options": f"-c statement_timeout={int(self._timeout_s * 1000)}",
                **tcp,
            },
        )

    async def connect(self) -> None:
        self._pool = self._open_pool()
        # Start even while PostgreSQL is down: sends are then delivered and queued, which is
        # the point of the realtime tier. The schema is checked as soon as it answers.
        await self._pool.open(wait=False)
        try:
            await self._probe()
            await self._ensure_schema()
        except DatabaseUnreachable as unreachable:
            log.warning("%s: sends are queued until it answers", unreachable)
            # Just found down: for one call bound, calls fail at once rather than each wait
            # out the bound for a connection (a CLI command then answers within one bound,
            # not two; a server starting queues its first sends without a wait).
            self._down, self._down_until = unreachable, time.monotonic() + self._timeout_s
        except BaseException:
            await self.close()
            raise

    async def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        try:
            if self._migrate_on_connect:
                await self.migrate()
            version = await self.schema_version()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unreachable(exc) from exc
        if version < SCHEMA_VERSION:
            raise SchemaMissing(
                f"schema {self._schema_name!r} is not at version {SCHEMA_VERSION}: "
                "run `dualwrite migrate` (or set DUALWRITE_MIGRATE_ON_START=1)"
            )
        self._schema_ready = True

    def _unreachable(self, exc: Exception) -> DatabaseUnreachable:
        return DatabaseUnreachable(
            f"cannot reach PostgreSQL at {redact_url(self._conninfo)} ({one_line(exc)})"
        )

    async def _probe(self) -> None:
        """One direct connection, so that a database that cannot be reached says why at once
        ("connection refused"), where the pool would only time out after `timeout_s`."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, connect_timeout=max(1, int(self._timeout_s))
            )
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from exc
        await conn.close()

    async def migrate_now(self) -> int:
        """`dualwrite migrate`: open, bring the schema up to date, close; raises
        `DatabaseUnreachable` rather than starting without the database as `connect` does."""
        self._pool = self._open_pool()
        try:
            await self._probe()
            await self._pool.open(wait=True, timeout=self._timeout_s)
            return await self.migrate()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unreachable(exc) from exc
        finally:
            await self.close()

    async def close(self) -> None:
        # Interrupted a second time, psycopg closes a connection instead of waiting on it.
        for task in list(self._left_behind):
            task.cancel()
        await asyncio.gather(*self._left_behind, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _q(self, text: str) -> bytes:
        # Composed once per statement: psycopg would walk the composition on every execute.
        query = self._queries.get(text)
        if query is None:
            query = self._queries[text] = sql.SQL(text).format(schema=self._schema).as_bytes()
        return query

    @property
    def _p(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            raise RuntimeError("PostgresPermanentStore is not connected")
        return self._pool

    async def _run(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        """``work`` on a pooled connection, in a task of its own that a caller who stops
        waiting (its bound ran out) leaves behind at once.

        psycopg lets the cancellation of a query through only after asking the server to
        cancel it and then waiting for the connection, up to 5 s each: through a proxy that
        stopped forwarding, a call bounded at 0.5 s returned after 10.5 s. The task left behind
        finishes that on its own and its connection goes back to the pool, or is closed.
        """
        if self._down is not None:
            if time.monotonic() < self._down_until:
                raise self._down
            self._down = None
        task = asyncio.create_task(self._on_connection(work))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            self._left_behind.add(task)
            task.add_done_callback(self._forget)
            raise

    async def _on_connection(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        for attempt in range(_ATTEMPTS_ON_LOST_CONNECTION):
            async with self._p.connection() as conn:
                try:
                    done = await work(conn)
                except psycopg.OperationalError:
                    # Lost since it last answered (the server restarted, a proxy dropped it):
                    # the pool drops it, and the work runs again on another. Every work here
                    # may run twice: inserts are ON CONFLICT DO NOTHING, the rest reads.
                    if conn.broken and attempt + 1 < _ATTEMPTS_ON_LOST_CONNECTION:
                        continue
                    raise
                return done
        raise AssertionError("unreachable")

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._left_behind.discard(task)
        if not task.cancelled():
            task.exception()  # its caller has had its timeout already

    async def schema_version(self) -> int:
        return await self._run(self._read_version)

    async def _read_version(self, conn: Connection) -> int:
        cur = await conn.execute(
            "SELECT obj_description(to_regnamespace(%s), 'pg_namespace')", (self._schema_name,)
        )
        row = await cur.fetchone()
        comment = row[0] if row else None
        return int(comment.removeprefix("dualwrite schema v")) if comment else 0

    async def migrate(self) -> int:
        """Bring the schema to the current version; safe to run concurrently and repeatedly.

        Returns the version the schema is at (a newer one than this code's is left alone).
        """
        return await self._run(self._migrate)

    async def _migrate(self, conn: Connection) -> int:
        async with conn.transaction():
            # One migrator at a time, across every process sharing the database.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._schema_name,))
            # Rebuilding an index takes as long as the table is big, not one call's bound.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(self._q("CREATE SCHEMA IF NOT EXISTS {schema}"))
            version = await self._read_version(conn)
            for step in _MIGRATIONS[version:]:
                await conn.execute(self._q(step))
            if version < SCHEMA_VERSION:
                version = SCHEMA_VERSION
                await conn.execute(
                    sql.SQL("COMMENT ON SCHEMA {schema} IS {comment}").format(
                        schema=self._schema, comment=f"dualwrite schema v{SCHEMA_VERSION}"
                    )
                )
        return version

    async def save(self, write: PermanentWrite) -> None:
        await self.save_many([write])

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        """One statement for the whole batch: rows arrive as arrays and are unnested."""
        columns: list[list[object]] = [[] for _ in range(7)]
        for write in writes:
            for column, value in zip(columns, write.as_row(), strict=True):
                column.append(value)
        query = self._q(
            "INSERT INTO {schema}.messages (workspace_id, channel_id, message_id, "
            'user_id, user_name, text, "timestamp", created_at) '
            "SELECT ws, ch, id, uid, uname, body, "
            f"COALESCE({_FROM_MS.replace('%s', 'sent')}, {_NOW}), {_NOW} "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::text[], %s::bigint[]) AS t(ws, ch, id, uid, uname, body, sent) "
            "ON CONFLICT DO NOTHING"
        )

        async def insert(conn: Connection) -> None:
            await conn.execute(query, columns)

        await self._ensure_schema()
        await self._run(insert)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        query = self._q(_SELECT + "WHERE workspace_id = %s AND channel_id = %s AND message_id = %s")
        params = (channel.workspace_id, channel.channel_id, message_id)
        await self._ensure_schema()
        rows = await self._run(_fetch(query, params))
        return _to_message(rows[0]) if rows else None

    async def find(self, message_id: str) -> StoredMessage | None:
        """A sequential scan (no index serves the id alone, and `inspect` is the only caller),
        cut off by `statement_timeout` on a table too large to scan in time."""
        await self._ensure_schema()
        query = self._q(_SELECT + "WHERE message_id = %s LIMIT 1")
        rows = await self._run(_fetch(query, (message_id,)))
        row = rows[0] if rows else None
        return _to_message(row) if row else None

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        if not message_ids:
            return {}
        await self._ensure_schema()
        query = self._q(
            _SELECT + "WHERE workspace_id = %s AND channel_id = %s AND message_id = ANY(%s::text[])"
        )
        params = (channel.workspace_id, channel.channel_id, list(message_ids))
        rows = await self._run(_fetch(query, params))
        return {row[2]: _to_message(row) for row in rows}

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        query, params = self._history_query(channel, before, limit)
        await self._ensure_schema()
        rows = await self._run(_fetch(query, params))
        return HistoryPage.from_candidates([_to_message(r) for r in rows], limit)

    def _history_query(
        self, channel: ChannelRef, before: str | None, limit: int
    ) -> tuple[bytes, list[object]]:
        """The statement reading one history page (and one more row, to tell if there is more).

        Ids compare bytewise (`COLLATE "C"`, as the columns since schema v2), so the index on
        (workspace, channel, timestamp desc, id desc) serves it in order, with no sort.
        """
        where = "WHERE workspace_id = %s AND channel_id = %s "
        params: list[object] = [channel.workspace_id, channel.channel_id]
        if before is not None:
            where += f'AND ("timestamp", message_id) < ({_FROM_MS}, %s COLLATE "C") '
            params += list(parse_history_cursor(before))
        order = 'ORDER BY "timestamp" DESC, message_id COLLATE "C" DESC LIMIT %s'
        return self._q(_SELECT + where + order), [*params, limit + 1]

    async def add_channel(self, channel: ChannelRef) -> None:
        await self._ensure_schema()
        query = self._q(
            "INSERT INTO {schema}.channels VALUES (%s, %s, now()) ON CONFLICT DO NOTHING"
        )
        await self._run(_fetch(query, (channel.workspace_id, channel.channel_id), rows=False))

    async def channels(self, workspace_id: str) -> list[str]:
        await self._ensure_schema()
        rows = await self._run(_fetch(self._q(_CHANNELS), {"ws": workspace_id}))
        return sorted(str(row[0]) for row in rows)


def _fetch(
    query: bytes, params: Sequence[object] | Mapping[str, object], *, rows: bool = True
) -> Callable[[Connection], Awaitable[list[tuple[Any, ...]]]]:
    async def fetch(conn: Connection) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if rows else []

    return fetch


def _to_message(row: tuple[Any, ...]) -> StoredMessage:
    ws, ch, message_id, user_id, user_name, text, timestamp, created_at = row
    return StoredMessage(
        ChannelRef(ws, ch), message_id, user_id, user_name, text, int(timestamp), int(created_at)
    )


def create(url: str, context: BackendContext) -> PermanentStore:
    return from_url(url, context)


def from_url(url: str, context: BackendContext) -> PostgresPermanentStore:
    """The store a `postgresql://` URL names (with `?schema=`, `?migrate=1`), not connected."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "dualwrite")
    migrate = query.pop("migrate", "").lower() in ("1", "true", "yes") or context.migrate_on_start
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    return PostgresPermanentStore(
        conninfo, schema, timeout_s=context.call_timeout_s, migrate_on_connect=migrate
    )
