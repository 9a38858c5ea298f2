"""PostgreSQL permanent store (`postgresql://user@host:port/db?schema=dualwrite`), psycopg 3.

Times are `timestamptz` truncated to the millisecond, so they round-trip exactly as the
milliseconds the rest of dualwrite speaks, and history cursors compare exactly.
Create the schema with `dualwrite migrate` (or `DUALWRITE_MIGRATE_ON_START=1`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dualwrite.backends import BackendContext
from dualwrite.errors import BackendError
from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    PermanentWrite,
    StoredMessage,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore
from dualwrite.settings import redact_url

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

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
]

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


class DatabaseUnreachable(BackendError):
    """PostgreSQL did not answer (down, cut off, or refusing connections)."""


class SchemaMissing(BackendError):
    """The database has no (or an older) dualwrite schema: run `dualwrite migrate`."""


class PostgresPermanentStore:
    def __init__(
        self, conninfo: str, schema: str, *, timeout_s: float, migrate_on_connect: bool
    ) -> None:
        self._conninfo = conninfo
        self._schema = sql.Identifier(schema)
        self._schema_name = schema
        self._timeout_s = timeout_s
        self._migrate_on_connect = migrate_on_connect
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._schema_ready = False

    async def connect(self) -> None:
        self._pool = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=10,
            open=False,
            timeout=self._timeout_s,
            # A connection broken by an outage is replaced before use, not handed to a write.
            check=AsyncConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(self._timeout_s)),
                "options": f"-c statement_timeout={int(self._timeout_s * 1000)}",
            },
        )
        # Start even while PostgreSQL is down: sends are then delivered and queued, which is
        # the point of the realtime tier. The schema is checked as soon as it answers.
        await self._pool.open(wait=False)
        try:
            await self._ensure_schema()
        except DatabaseUnreachable as unreachable:
            log.warning("%s; sends will queue until it answers", unreachable)
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
            raise DatabaseUnreachable(
                f"cannot reach PostgreSQL at {redact_url(self._conninfo)}: {exc}"
            ) from exc
        if version < SCHEMA_VERSION:
            raise SchemaMissing(
                f"schema {self._schema_name!r} is not at version {SCHEMA_VERSION}: "
                "run `dualwrite migrate` (or set DUALWRITE_MIGRATE_ON_START=1)"
            )
        self._schema_ready = True

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._schema)

    @property
    def _p(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("PostgresPermanentStore is not connected")
        return self._pool

    async def schema_version(self) -> int:
        async with self._p.connection() as conn:
            cur = await conn.execute(
                "SELECT obj_description(to_regnamespace(%s), 'pg_namespace')", (self._schema_name,)
            )
            row = await cur.fetchone()
        comment = row[0] if row else None
        return int(comment.removeprefix("dualwrite schema v")) if comment else 0

    async def migrate(self) -> int:
        """Bring the schema to the current version; safe to run concurrently and repeatedly."""
        async with self._p.connection() as conn, conn.transaction():
            # One migrator at a time, across every process sharing the database.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._schema_name,))
            await conn.execute(self._q("CREATE SCHEMA IF NOT EXISTS {schema}"))
            for step in _MIGRATIONS:
                await conn.execute(self._q(step))
            await conn.execute(
                self._q("COMMENT ON SCHEMA {schema} IS ")
                + sql.Literal(f"dualwrite schema v{SCHEMA_VERSION}")
            )
        return SCHEMA_VERSION

    async def save(self, write: PermanentWrite) -> None:
        await self.save_many([write])

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        """One statement for the whole batch: rows arrive as arrays and are unnested."""
        columns: list[list[object]] = [[] for _ in range(7)]
        for write in writes:
            for column, value in zip(columns, write.as_row(), strict=True):
                column.append(value)
        await self._ensure_schema()
        async with self._p.connection() as conn:
            await conn.execute(
                self._q(
                    "INSERT INTO {schema}.messages (workspace_id, channel_id, message_id, "
                    'user_id, user_name, text, "timestamp", created_at) '
                    "SELECT ws, ch, id, uid, uname, body, "
                    f"COALESCE({_FROM_MS.replace('%s', 'sent')}, {_NOW}), {_NOW} "
                    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
                    "%s::text[], %s::bigint[]) AS t(ws, ch, id, uid, uname, body, sent) "
                    "ON CONFLICT DO NOTHING"
                ),
                columns,
            )

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        await self._ensure_schema()
        async with self._p.connection() as conn:
            cur = await conn.execute(
                self._q(
                    _SELECT + "WHERE workspace_id = %s AND channel_id = %s AND message_id = %s"
                ),
                (channel.workspace_id, channel.channel_id, message_id),
            )
            row = await cur.fetchone()
        return _to_message(row) if row else None

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        if not message_ids:
            return {}
        await self._ensure_schema()
        async with self._p.connection() as conn:
            cur = await conn.execute(
                self._q(
                    _SELECT + "WHERE workspace_id = %s AND channel_id = %s "
                    "AND message_id = ANY(%s::text[])"
                ),
                (channel.workspace_id, channel.channel_id, list(message_ids)),
            )
            rows = await cur.fetchall()
        return {row[2]: _to_message(row) for row in rows}

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        where = "WHERE workspace_id = %s AND channel_id = %s "
        params: list[object] = [channel.workspace_id, channel.channel_id]
        if before is not None:
            where += f'AND ("timestamp", message_id) < ({_FROM_MS}, %s) '
            params += list(parse_history_cursor(before))
        await self._ensure_schema()
        async with self._p.connection() as conn:
            cur = await conn.execute(
                self._q(_SELECT + where + 'ORDER BY "timestamp" DESC, message_id DESC LIMIT %s'),
                (*params, limit + 1),
            )
            rows = await cur.fetchall()
        return HistoryPage.from_candidates([_to_message(r) for r in rows], limit)


def _to_message(row: tuple[Any, ...]) -> StoredMessage:
    ws, ch, message_id, user_id, user_name, text, timestamp, created_at = row
    return StoredMessage(
        ChannelRef(ws, ch), message_id, user_id, user_name, text, int(timestamp), int(created_at)
    )


def create(url: str, context: BackendContext) -> PermanentStore:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "dualwrite")
    migrate = query.pop("migrate", "").lower() in ("1", "true", "yes") or context.migrate_on_start
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    return PostgresPermanentStore(
        conninfo, schema, timeout_s=context.call_timeout_s, migrate_on_connect=migrate
    )
