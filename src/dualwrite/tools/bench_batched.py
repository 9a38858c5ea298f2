"""The batched raw baseline of `dualwrite bench --baseline raw-batched`: the practical ceiling.

Per message, the backend work the library does, with bare clients and in batches, as a careful
hand-written client would do it: sends that arrive while a batch is out wait for the next one,
and each batch is one Redis pipeline (per message the realtime tier's own write script, by
EVALSHA, on keys of the same shape; the channel registry and the list of channels holding
"unconfirmed" marks; the previous batches' marks cleared, and a channel left without any taken
off that list) and then one multi-row insert into a table shaped like the store's, with its
indexes. A message's sender hears back only once both writes of its batch are done, so the
order (realtime, then permanent) and the durability before answering are the library's. A
reader blocks in XREAD over the channels' streams, as the library's live feed does, so both
sides pay for delivery too. The embedded backends (`memory://` + SQLite) get the same shape:
a dict and a queue per message, one transaction of `executemany` per batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dualwrite.backends.permanent.sqlite import sqlite_path
from dualwrite.tools.bench_raw import _without_query

TTL_MS = 3_600_000
_PUSH = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
MAX_BATCH = 256
"""As the library's group commit and pipelined Redis writes."""
MAX_IN_FLIGHT = 4
"""Batches out at once (the library allows 4 permanent and 8 realtime batches)."""


def push_id(now_ms: int) -> str:
    """A push id (8 time characters, 12 random): the same key length and order as the
    library's, so the script trims and indexes the same way."""
    head = []
    for _ in range(8):
        head.append(_PUSH[now_ms % 64])
        now_ms //= 64
    return "".join(reversed(head)) + "".join(_PUSH[b % 64] for b in secrets.token_bytes(12))


def time_prefix(ms: int) -> str:
    return push_id(ms)[:8]


@dataclass
class Item:
    index: int
    channel: str
    message_id: str
    record: dict[str, Any]
    done: asyncio.Future[None]


Commit = Callable[[Sequence[Item]], Awaitable[None]]


class Batches:
    """Sends queue while batches are out; each free slot takes all that queued (up to
    `MAX_BATCH`). Bare: a deque, a semaphore and a task per batch."""

    def __init__(self, commit: Commit) -> None:
        self._commit = commit
        self._queue: collections.deque[Item] = collections.deque()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._drainer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, index: int, channel: str) -> None:
        now = int(time.time() * 1000)
        record = {
            "userId": "bench-user",
            "userName": "Bench",
            "text": f"bench message {index}",
            "timestamp": now,
            "ttl": now + TTL_MS,
        }
        item = Item(
            index, channel, push_id(now), record, asyncio.get_running_loop().create_future()
        )
        self._queue.append(item)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        await item.done

    async def _drain(self) -> None:
        while self._queue:
            await self._slots.acquire()
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Item]) -> None:
        try:
            await self._commit(batch)
        except Exception as error:
            for item in batch:
                item.done.set_exception(error)
        else:
            for item in batch:
                item.done.set_result(None)
        finally:
            self._slots.release()


Arrival = Callable[[int], None]
"""Called with a message's index when the reader sees it."""


@contextlib.asynccontextmanager
async def _realtime(
    url: str, channels: list[str], arrived: Arrival
) -> AsyncIterator[Callable[[Sequence[Item]], Awaitable[Callable[[], None]]] | None]:
    """A batch's realtime writes; each returns a callback to run once the batch is saved."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        entries: dict[str, str] = {}
        delivered: asyncio.Queue[str] = asyncio.Queue()

        async def read_memory() -> None:
            while True:
                data = json.loads(await delivered.get())
                arrived(int(data["text"].rsplit(" ", 1)[1]))

        reader = asyncio.create_task(read_memory())

        async def write_memory(batch: Sequence[Item]) -> Callable[[], None]:
            for item in batch:
                encoded = json.dumps(item.record)
                entries[item.message_id] = encoded
                delivered.put_nowait(encoded)
            return lambda: None

        try:
            yield write_memory
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    elif scheme in ("redis", "rediss"):
        import redis.asyncio as aioredis

        # The tier's own script, so both sides run the same Lua per message.
        from dualwrite.backends.realtime.redis import _WRITE

        clean, picked = _without_query(url, "prefix", "max_connections")
        prefix = picked.get("prefix", "dualwrite:") + "rawbatched:"
        pool = aioredis.BlockingConnectionPool.from_url(
            clean, max_connections=64, timeout=5, decode_responses=True
        )
        # Any: redis-py types every reply as bytes-or-str (decode_responses decides).
        client: Any = aioredis.Redis(connection_pool=pool)
        sha = await client.script_load(_WRITE)
        confirms: list[tuple[str, str]] = []

        def key(channel: str, part: str) -> str:
            return f"{prefix}{{bench/{channel}}}:{part}"

        # Each stream from its last entry ("$" would skip what lands between two reads).
        streams: dict[str, str] = {}
        for channel in channels:
            last = await client.xrevrange(key(channel, "stream"), "+", "-", count=1)
            streams[key(channel, "stream")] = last[0][0] if last else "0-0"
        listener: Any = aioredis.Redis.from_url(clean, single_connection_client=True)

        async def read_redis() -> None:
            positions = dict(streams)
            while True:
                reply = await listener.xread(positions, count=500, block=1000)
                for stream, entries in reply or ():
                    for entry_id, fields in entries:
                        positions[stream.decode()] = entry_id.decode()
                        data = json.loads(fields[b"data"])
                        arrived(int(data["text"].rsplit(" ", 1)[1]))

        reader = asyncio.create_task(read_redis())

        async def write_redis(batch: Sequence[Item]) -> Callable[[], None]:
            now = int(time.time() * 1000)
            latest: dict[str, int] = {}
            oldest: dict[str, int] = {}
            for item in batch:
                name, sent = f"bench/{item.channel}", item.record["timestamp"]
                latest[name] = max(latest.get(name, 0), sent)
                oldest[name] = min(oldest.get(name, sent), sent)
            cleared: dict[str, list[str]] = {}
            for channel, message_id in confirms:
                cleared.setdefault(channel, []).append(message_id)
            confirms.clear()
            async with client.pipeline(transaction=False) as pipe:
                # The channel registry and the list of channels with marks, before and after
                # the marks; the previous batches' marks cleared (with what is left of each).
                pipe.zadd(f"{prefix}channels", latest, gt=True)
                pipe.zadd(f"{prefix}unconfirmed-channels", oldest, lt=True)
                for item in batch:
                    c = item.channel
                    pipe.evalsha(
                        sha,
                        5,
                        key(c, f"msg:{item.message_id}"),
                        key(c, "index"),
                        key(c, "stream"),
                        key(c, "time"),
                        key(c, "unconfirmed"),
                        item.message_id,
                        json.dumps(item.record, ensure_ascii=False, separators=(",", ":")),
                        max(1, item.record["ttl"] - now),
                        time_prefix(max(0, now - TTL_MS)),
                        TTL_MS,
                        item.record["timestamp"],
                        now - TTL_MS,
                        "",  # no cluster: no wake-up channel
                    )
                pipe.zadd(f"{prefix}unconfirmed-channels", oldest, lt=True)
                for channel, message_ids in cleared.items():
                    pipe.zrem(key(channel, "unconfirmed"), *message_ids)
                    pipe.zcard(key(channel, "unconfirmed"))
                replies = await pipe.execute()
            left = replies[len(batch) + 3 :][1::2]
            empty = [c for c, n in zip(cleared, left, strict=True) if not n]
            if empty:
                # A channel left without marks comes off the list (checked again after).
                await client.zrem(f"{prefix}unconfirmed-channels", *(f"bench/{c}" for c in empty))
                async with client.pipeline(transaction=False) as pipe:
                    for channel in empty:
                        pipe.zrange(key(channel, "unconfirmed"), 0, 0, withscores=True)
                    await pipe.execute()

            def saved() -> None:
                # Cleared with the next batch, off this one's path, as the library does.
                confirms.extend((item.channel, item.message_id) for item in batch)

            return saved

        try:
            yield write_redis
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await listener.aclose()
            await client.delete(f"{prefix}channels", f"{prefix}unconfirmed-channels")
            await client.aclose()
    else:
        yield None


@contextlib.asynccontextmanager
async def _store(url: str) -> AsyncIterator[Callable[[Sequence[Item]], Awaitable[None]] | None]:
    """A batch's permanent insert, one statement or transaction."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        executor = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(executor, _open_sqlite, sqlite_path(url) + ".rawbatched")

        async def insert_sqlite(batch: Sequence[Item]) -> None:
            rows = [_row(item) for item in batch]
            await loop.run_in_executor(executor, _insert_sqlite, conn, rows)

        try:
            yield insert_sqlite
        finally:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown()
    elif scheme in ("postgresql", "postgres"):
        from psycopg import sql
        from psycopg_pool import AsyncConnectionPool

        clean, picked = _without_query(url, "schema", "migrate")
        schema = sql.Identifier(picked.get("schema", "dualwrite"))
        # Beside the store's own table in its schema (which the library run made), with the
        # same columns, keys and indexes.
        table = sql.SQL("{}.rawbatched_messages").format(schema)
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
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {}.messages INCLUDING ALL)").format(
                    table, schema
                )
            )
            await setup.execute(sql.SQL("TRUNCATE {}").format(table))
        insert = sql.SQL(
            "INSERT INTO {} (workspace_id, channel_id, message_id, user_id, user_name, text, "
            '"timestamp", created_at) '
            "SELECT ws, ch, id, uid, uname, body, date_trunc('milliseconds', now()), "
            "date_trunc('milliseconds', now()) "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::text[]) AS t(ws, ch, id, uid, uname, body) ON CONFLICT DO NOTHING"
        ).format(table)

        async def insert_postgres(batch: Sequence[Item]) -> None:
            columns: list[list[str]] = [[] for _ in range(6)]
            for item in batch:
                for column, value in zip(columns, _row(item)[:6], strict=True):
                    column.append(str(value))
            async with pool.connection() as conn:
                await conn.execute(insert, columns)

        try:
            yield insert_postgres
        finally:
            async with pool.connection() as cleanup:
                await cleanup.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            await pool.close()
    else:
        yield None


def _row(item: Item) -> tuple[str, str, str, str, str, str, int]:
    r = item.record
    return ("bench", item.channel, item.message_id, r["userId"], r["userName"], r["text"], 0)


def _open_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS messages (workspace_id TEXT NOT NULL, channel_id TEXT NOT "
        "NULL, message_id TEXT NOT NULL, user_id TEXT NOT NULL, user_name TEXT NOT NULL, "
        "text TEXT NOT NULL, timestamp INTEGER NOT NULL, created_at INTEGER NOT NULL, "
        "PRIMARY KEY (workspace_id, channel_id, message_id)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE INDEX IF NOT EXISTS messages_history "
        "ON messages (workspace_id, channel_id, timestamp, message_id)"
    )
    return conn


def _insert_sqlite(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    now = int(time.time() * 1000)
    with conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*row[:6], now, now) for row in rows],
        )


@contextlib.asynccontextmanager
async def raw_batched(
    realtime_url: str, store_url: str, channels: list[str], arrived: Arrival
) -> AsyncIterator[Batches | None]:
    """Batched bare writes on these backends, or None where there is no such baseline."""
    async with (
        _realtime(realtime_url, channels, arrived) as write,
        _store(store_url) as insert,
    ):
        if write is None or insert is None:
            yield None
            return
        realtime_write, permanent_insert = write, insert

        async def commit(batch: Sequence[Item]) -> None:
            saved = await realtime_write(batch)
            await permanent_insert(batch)
            saved()

        yield Batches(commit)
