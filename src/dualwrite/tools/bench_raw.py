"""The raw baseline of `dualwrite bench --baseline raw`: per message, the same backend work with
bare clients and no dualwrite code, awaited in sequence as the story's client does: one
realtime write with its notification, then one permanent insert. Only the self-hosted backends
have one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dualwrite.backends.permanent.sqlite import sqlite_path

RawWrite = Callable[[int, dict[str, Any]], Awaitable[None]]


def _without_query(url: str, *names: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    picked = {n: query.pop(n) for n in names if n in query}
    return urlunsplit(parts._replace(query=urlencode(query))), picked


@contextlib.asynccontextmanager
async def raw_realtime(url: str) -> AsyncIterator[RawWrite | None]:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        entries: dict[str, str] = {}
        subscribers: list[asyncio.Queue[str]] = [asyncio.Queue()]

        async def write_memory(index: int, record: dict[str, Any]) -> None:
            encoded = json.dumps(record)
            entries[str(index)] = encoded
            for queue in subscribers:
                queue.put_nowait(encoded)

        yield write_memory
    elif scheme in ("redis", "rediss"):
        import redis.asyncio as aioredis

        clean, picked = _without_query(url, "prefix", "max_connections")
        prefix = picked.get("prefix", "dualwrite:") + "rawbench:"  # under the tier's own prefix
        pool = aioredis.BlockingConnectionPool.from_url(clean, max_connections=64, timeout=5)
        client = aioredis.Redis(connection_pool=pool)

        async def write_redis(index: int, record: dict[str, Any]) -> None:
            encoded = json.dumps(record)
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(f"{prefix}msg:{index}", encoded, px=3_600_000)
                pipe.publish(f"{prefix}channel", encoded)
                await pipe.execute()

        try:
            yield write_redis
        finally:
            await client.aclose()
    else:
        yield None


@contextlib.asynccontextmanager
async def raw_store(url: str) -> AsyncIterator[RawWrite | None]:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        executor = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(executor, _open_sqlite, sqlite_path(url) + ".raw")

        async def insert_sqlite(index: int, record: dict[str, Any]) -> None:
            await loop.run_in_executor(executor, _insert_sqlite, conn, index, record)

        try:
            yield insert_sqlite
        finally:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown()
    elif scheme in ("postgresql", "postgres"):
        from psycopg import sql
        from psycopg_pool import AsyncConnectionPool

        clean, picked = _without_query(url, "schema", "migrate")
        # Beside the measured store's own table, in its schema (which the dualwrite run made):
        # a shared database is touched nowhere else, and both runs write to the same place.
        table = sql.Identifier(picked.get("schema", "dualwrite"), "dualwrite_rawbench")
        pool = AsyncConnectionPool(
            clean.replace("postgres://", "postgresql://", 1),
            min_size=4,
            max_size=10,
            open=False,
            kwargs={"autocommit": True},
        )
        await pool.open(wait=True)
        async with pool.connection() as setup:
            await setup.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY, user_id text, "
                    "user_name text, text text, ts timestamptz, created timestamptz)"
                ).format(table)
            )
            await setup.execute(sql.SQL("TRUNCATE {}").format(table))

        async def insert_postgres(index: int, record: dict[str, Any]) -> None:
            async with pool.connection() as pooled:
                await pooled.execute(
                    sql.SQL(
                        "INSERT INTO {} VALUES (%s, %s, %s, %s, now(), now()) "
                        "ON CONFLICT DO NOTHING"
                    ).format(table),
                    (index, record["userId"], record["userName"], record["text"]),
                )

        try:
            yield insert_postgres
        finally:
            await pool.close()
    else:
        yield None


def _open_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, user_id TEXT, "
        "user_name TEXT, text TEXT, ts INTEGER, created INTEGER)"
    )
    return conn


def _insert_sqlite(conn: sqlite3.Connection, index: int, record: dict[str, Any]) -> None:
    now = int(time.time() * 1000)
    conn.execute(
        "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
        (index, record["userId"], record["userName"], record["text"], now, now),
    )


def raw_record(index: int) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "userId": "bench-user",
        "userName": "Bench",
        "text": f"bench message {index}",
        "timestamp": now,
        "ttl": now + 3_600_000,
    }
