"""Redis realtime tier (`redis://host:port/db?prefix=dualwrite:`), with redis-py's asyncio client.

Per channel, under one hash tag so a cluster keeps them on one slot:
- `{prefix}{ws/ch}:msg:{id}`: the record (JSON), expiring by Redis's own TTL at `ttl`;
- `{prefix}{ws/ch}:index`: a sorted set of the channel's ids, for reads in id order;
- `{prefix}{ws/ch}:time`: a sorted set of the ids scored by send time (ties in id order, as
  Redis orders equal scores by member), read by bounded reverse ranges for history pages;
- `{prefix}{ws/ch}:unconfirmed`: the same, for the messages not yet confirmed saved; the
  reconciler reads only this;
- `{prefix}{ws/ch}:stream`: a stream of every write, trimmed to the last hour. Its entry ids
  are the live cursors: they follow write order (a rewrite is a new entry), and a client that
  resumes after one misses nothing (pub/sub would). `max-deleted-entry-id` tells a cursor whose
  successors were trimmed away (`CursorExpired`).
Per workspace, `{prefix}events:{ws}` is a short stream of live events ("saved", "channel"),
read the same way, so a listener between two blocking reads misses none.
A write touches all of them in one Lua call, so a reader never sees half of it; concurrent
writes travel together in one pipeline. `{prefix}channels` (scored by last write) lists the
channels, so inspect and the sweep never scan the keyspace; it is written just before the
script in the same pipeline (it lives on another slot), so a channel is listed no later than
its messages. `{prefix}unconfirmed-channels` lists the channels that hold marks, scored by
their oldest mark (or earlier): written just after the script, and a channel leaves it only
when a check made after its removal finds no mark, so a reconcile round visits what is
unsaved, never every active channel. Redis expires records and idle channels' keys by itself
(each write trims the indexes and renews their TTL); the sweep only trims the registry. Live
delivery is one `LiveFeed` per process: a few readers, each one connection blocking in XREAD
over up to `live_streams_per_read` streams at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dualwrite._coalesce import Coalescer
from dualwrite.backends import BackendContext
from dualwrite.backends._batches import next_batches
from dualwrite.clock import Clock
from dualwrite.errors import BackendUnavailable, CursorExpired, InvalidInput
from dualwrite.ids import time_prefix
from dualwrite.logs import one_line
from dualwrite.model import (
    REALTIME_TTL_MS,
    ChannelRef,
    LiveEntry,
    LiveEvent,
    RealtimeMessage,
    ReplayPage,
)
from dualwrite.ports import LiveFeed, RealtimeTier, SendClaim, SendKey, TokenRequest
from dualwrite.redact import redact_url

log = logging.getLogger(__name__)

_WRITE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = string.format('%d', now_ms - tonumber(ARGV[5]))
local sid = redis.call('XADD', KEYS[3], 'MINID', '~', minid, '*', 'id', ARGV[1], 'data', ARGV[2])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZREMRANGEBYLEX', KEYS[2], '-', '(' .. ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[7])
for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return sid
"""

# Token buckets, one hash {tokens, stamp} per key, on Redis's clock; all or nothing: if one
# bucket lacks its cost, none is charged. ARGV holds cost, rate, burst per key. A bucket is
# forgotten once it would be full again.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels, wait = {}, 0
for i, key in ipairs(KEYS) do
  local cost, rate, burst = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local held = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens = tonumber(held[1]) or burst
  local stamp = tonumber(held[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  levels[i] = tokens
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local cost, rate, burst = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tokens = levels[i] - cost
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
end
return '0'
"""

# The newest entries at or below a score, with their records, as one JSON text: a page is one
# round trip and one json.loads, not a range, an MGET and a hundred replies to parse. The record
# keys are named from ARGV, not KEYS (they are known only inside): they share the index's hash
# tag, so a cluster finds them on the same slot.
_READ_BEFORE = """
local ids = redis.call('ZRANGE', KEYS[1], ARGV[1], '-inf', 'BYSCORE', 'REV',
                       'LIMIT', ARGV[2], ARGV[3], 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  local raw = redis.call('GET', ARGV[4] .. ids[i])
  out[#out + 1] = '[' .. cjson.encode(ids[i]) .. ',' .. ids[i + 1] .. ',' .. (raw or 'null') .. ']'
end
return '[' .. table.concat(out, ',') .. ']'
"""

_DELETE = """
redis.call('DEL', KEYS[1])
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
"""

_BLOCK_MS = 1000
_EVENTS_KEPT = 1000
_PER_STREAM = 500
"""Entries one XREAD takes from each stream."""
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


class RedisRealtimeTier:
    def __init__(
        self,
        url: str,
        prefix: str,
        clock: Clock,
        timeout_s: float,
        streams_per_read: int,
        max_connections: int = 64,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._clock = clock
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self.streams_per_read = streams_per_read
        self._options: dict[str, Any] = {}
        self._redis: aioredis.Redis | None = None
        self._write_script: Any = None
        self._take_script: Any = None
        self._read_before_script: Any = None
        self._writes: Coalescer[tuple[ChannelRef, RealtimeMessage]] = Coalescer(
            self._write_many, self._write_one, max_batch=256, max_in_flight=8
        )
        # Every saved send clears its mark: concurrent ones share one pipeline.
        self._confirms: Coalescer[tuple[ChannelRef, tuple[str, ...]]] = Coalescer(
            self._confirm_many, self._confirm_one, max_batch=256, max_in_flight=8
        )

    async def connect(self) -> None:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": max(self._timeout_s, _BLOCK_MS / 1000 * 2),
            "socket_connect_timeout": self._timeout_s,
            "health_check_interval": 30,
        }
        # Commands wait (up to the call timeout) for one of a bounded set of connections,
        # rather than failing when a burst of sends outnumbers them.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=self._max_connections, timeout=self._timeout_s, **options
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._options = options
        self._write_script = self._redis.register_script(_WRITE)
        self._take_script = self._redis.register_script(_TAKE)
        self._read_before_script = self._redis.register_script(_READ_BEFORE)
        try:
            await self._redis.script_load(_WRITE)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # Without the realtime tier no send can succeed: say so in one line, not a driver
            # traceback. (The caller closes what connect opened.)
            raise BackendUnavailable(
                f"cannot reach Redis at {redact_url(self._url)} ({one_line(exc)}): "
                "sends fail until it answers"
            ) from exc

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        self._redis = None

    def reader_connection(self) -> Any:
        """A connection of its own for a live reader: a blocking XREAD never holds a pooled
        connection the writes need."""
        return aioredis.Redis.from_url(self._url, single_connection_client=True, **self._options)

    def stream_key(self, channel: ChannelRef) -> str:
        return self._key(channel, "stream")

    def decode_entry(self, channel: ChannelRef, entry_id: str, fields: Any) -> LiveEntry | None:
        """A stream entry as a `LiveEntry`, unless expired by the (injectable) clock."""
        try:
            message = RealtimeMessage.from_wire(fields["id"], json.loads(fields["data"]))
        except (KeyError, ValueError, TypeError):
            # Not ours (another writer, a damaged entry): skipped, so it cannot stop the
            # reader of every channel, nor a resume that would meet it again and again.
            log.warning("skipping a malformed stream entry: %s %s", channel, entry_id)
            return None
        if message.expired(self._clock.now_ms()):
            return None
        return LiveEntry(channel, message, entry_id)

    @property
    def _r(self) -> Any:
        # Any: redis-py types every reply as bytes-or-str; decode_responses=True makes them str.
        if self._redis is None:
            raise RuntimeError("RedisRealtimeTier is not connected")
        return self._redis

    def _key(self, channel: ChannelRef, part: str) -> str:
        return f"{self._prefix}{{{channel.workspace_id}/{channel.channel_id}}}:{part}"

    @property
    def _registry(self) -> str:
        return f"{self._prefix}channels"

    @property
    def _unconfirmed_channels(self) -> str:
        return f"{self._prefix}unconfirmed-channels"

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        await self._writes.submit((channel, message))

    def _script_call(self, channel: ChannelRef, message: RealtimeMessage) -> dict[str, Any]:
        record = json.dumps(message.to_wire(), ensure_ascii=False, separators=(",", ":"))
        now = self._clock.now_ms()
        return {
            "keys": [
                self._key(channel, f"msg:{message.message_id}"),
                self._key(channel, "index"),
                self._key(channel, "stream"),
                self._key(channel, "time"),
                self._key(channel, "unconfirmed"),
            ],
            "args": [
                message.message_id,
                record,
                max(1, message.ttl - now),
                time_prefix(max(0, now - REALTIME_TTL_MS)),
                REALTIME_TTL_MS,
                message.timestamp,
                now - REALTIME_TTL_MS,
            ],
        }

    def _register(self, pipe: Any, items: Sequence[tuple[ChannelRef, RealtimeMessage]]) -> None:
        latest: dict[str, int] = {}
        for channel, message in items:
            name = _name(channel)
            latest[name] = max(latest.get(name, 0), message.timestamp)
        pipe.zadd(self._registry, latest, gt=True)

    def _list_unconfirmed(
        self, pipe: Any, items: Sequence[tuple[ChannelRef, RealtimeMessage]]
    ) -> None:
        # After the marks: see `_settle` for why that order keeps every marked channel listed.
        oldest: dict[str, int] = {}
        for channel, message in items:
            name = _name(channel)
            oldest[name] = min(oldest.get(name, message.timestamp), message.timestamp)
        pipe.zadd(self._unconfirmed_channels, oldest, lt=True)

    async def _write_one(self, item: tuple[ChannelRef, RealtimeMessage]) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            self._register(pipe, [item])
            await pipe.execute()
        # Script.__call__ reloads the script if Redis lost it (restart, SCRIPT FLUSH).
        await self._write_script(**self._script_call(*item))
        async with self._r.pipeline(transaction=False) as pipe:
            self._list_unconfirmed(pipe, [item])
            await pipe.execute()

    async def _write_many(self, items: Sequence[tuple[ChannelRef, RealtimeMessage]]) -> None:
        """Concurrent writes in one pipeline: one round trip, each still one atomic script.
        If any fails (NOSCRIPT after a restart, say) the caller retries them one by one."""
        async with self._r.pipeline(transaction=False) as pipe:
            self._register(pipe, items)
            for item in items:
                call = self._script_call(*item)
                pipe.evalsha(
                    self._write_script.sha, len(call["keys"]), *call["keys"], *call["args"]
                )
            self._list_unconfirmed(pipe, items)
            await pipe.execute()

    def _decode(self, message_id: str, raw: str | None) -> RealtimeMessage | None:
        """The record, unless missing or expired by the (injectable) clock."""
        if raw is None:
            return None
        message = RealtimeMessage.from_wire(message_id, json.loads(raw))
        return None if message.expired(self._clock.now_ms()) else message

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        raw = await self._r.get(self._key(channel, f"msg:{message_id}"))
        return self._decode(message_id, raw)

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        found: list[RealtimeMessage] = []
        start = "-" if after_id is None else f"({after_id}"
        while len(found) < limit:
            ids = await self._r.zrangebylex(self._key(channel, "index"), start, "+", 0, limit)
            if not ids:
                break
            raws = await self._r.mget([self._key(channel, f"msg:{i}") for i in ids])
            for message_id, raw in zip(ids, raws, strict=True):
                message = self._decode(message_id, raw)
                if message is not None and len(found) < limit:
                    found.append(message)
            start = f"({ids[-1]}"
        return found

    async def _records(
        self, channel: ChannelRef, ids: Sequence[str]
    ) -> list[tuple[str, RealtimeMessage | None]]:
        raws = await self._r.mget([self._key(channel, f"msg:{i}") for i in ids]) if ids else []
        return [(i, self._decode(i, raw)) for i, raw in zip(ids, raws, strict=True)]

    async def read_before(
        self, channel: ChannelRef, before: tuple[int, str] | None, limit: int
    ) -> list[RealtimeMessage]:
        top = "+inf" if before is None else str(before[0])
        now = self._clock.now_ms()
        found: list[RealtimeMessage] = []
        offset = 0
        # Usually one call. More only to step over entries at the cursor's own millisecond
        # that are not below it, or expired ones the write has not trimmed yet.
        while len(found) < limit:
            want = limit - len(found) + 8
            text = await self._read_before_script(
                keys=[self._key(channel, "time")],
                args=[top, offset, want, self._key(channel, "msg:")],
            )
            rows = json.loads(text)
            for message_id, score, data in rows:
                if before is not None and (int(score), message_id) >= before:
                    continue
                if isinstance(data, dict):
                    message = RealtimeMessage.from_wire(message_id, data)
                    if not message.expired(now):
                        found.append(message)
            if len(rows) < want:
                break
            offset += len(rows)
        return found[:limit]

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        keys = [
            self._key(channel, f"msg:{message_id}"),
            *(self._key(channel, part) for part in ("index", "time", "unconfirmed")),
        ]
        await self._r.eval(_DELETE, len(keys), *keys, message_id)

    async def unconfirmed(
        self,
        channel: ChannelRef,
        after: tuple[int, str] | None,
        sent_until_ms: int,
        limit: int,
    ) -> list[RealtimeMessage]:
        index = self._key(channel, "unconfirmed")
        found: list[RealtimeMessage] = []
        gone: list[str] = []
        if after is not None:
            tied = await self._r.zrangebyscore(index, after[0], after[0])
            above = [i for i in tied if i > after[1]] if after[0] <= sent_until_ms else []
            for message_id, message in await self._records(channel, above):
                (found.append(message) if message else gone.append(message_id))
        bottom = "-inf" if after is None else f"({after[0]}"
        offset = 0
        while len(found) < limit:
            want = limit - len(found)
            ids = await self._r.zrangebyscore(index, bottom, sent_until_ms, start=offset, num=want)
            if not ids:
                break
            for message_id, message in await self._records(channel, ids):
                (found.append(message) if message else gone.append(message_id))
            offset += len(ids)
        if gone:  # expired or deleted: nothing left to save
            await self._r.zrem(index, *gone)
        return found[:limit]

    async def unconfirmed_channels(self, sent_until_ms: int) -> list[ChannelRef]:
        names = await self._r.zrangebyscore(self._unconfirmed_channels, "-inf", sent_until_ms)
        channels = [_channel(name) for name in names]
        # A channel listed with no mark that old is put back at its oldest mark (or dropped):
        # the next round does not visit it again before that mark is due.
        async with self._r.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.zcount(self._key(channel, "unconfirmed"), "-inf", sent_until_ms)
            counts = await pipe.execute()
        due = [c for c, n in zip(channels, counts, strict=True) if int(n)]
        await self._settle([c for c, n in zip(channels, counts, strict=True) if not int(n)])
        return due

    async def _settle(self, channels: Sequence[ChannelRef]) -> None:
        """Take ``channels`` off the list of channels with marks, then list again at its oldest
        mark any that has one. A write adds its mark before listing its channel, so a write
        listed before the removal has its mark seen by the check after it: no marked channel
        is ever left off. Two steps, awaited in turn, so the order holds on any deployment."""
        if not channels:
            return
        await self._r.zrem(self._unconfirmed_channels, *{_name(c) for c in channels})
        async with self._r.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.zrange(self._key(channel, "unconfirmed"), 0, 0, withscores=True)
            oldest = await pipe.execute()
        marked = {_name(c): int(o[0][1]) for c, o in zip(channels, oldest, strict=True) if o}
        if marked:
            await self._r.zadd(self._unconfirmed_channels, marked, lt=True)

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._confirms.submit((channel, tuple(message_ids)))

    async def _confirm_one(self, item: tuple[ChannelRef, tuple[str, ...]]) -> None:
        await self._confirm_many([item])

    async def _confirm_many(self, items: Sequence[tuple[ChannelRef, tuple[str, ...]]]) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            for channel, message_ids in items:
                pipe.zrem(self._key(channel, "unconfirmed"), *message_ids)
                pipe.zcard(self._key(channel, "unconfirmed"))
            replies = await pipe.execute()
        await self._settle(
            [c for (c, _), left in zip(items, replies[1::2], strict=True) if not left]
        )

    async def read_after(self, channel: ChannelRef, cursor: str | None, limit: int) -> ReplayPage:
        if cursor is not None and (
            not _STREAM_ID.fullmatch(cursor) or max(_position(cursor)) >= 2**64
        ):
            raise InvalidInput("cursor", "is not a cursor of this realtime tier")
        stream = self.stream_key(channel)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.xrange(stream, "-" if cursor is None else f"({cursor}", "+", count=limit)
            pipe.xinfo_stream(stream)
            raw, info = await pipe.execute(raise_on_error=False)
        if isinstance(raw, Exception):
            raise raw
        if cursor is not None:
            self._check_kept(cursor, None if isinstance(info, Exception) else info)
        entries = []
        for entry_id, fields in raw:
            entry = self.decode_entry(channel, entry_id, fields)
            if entry is not None:
                entries.append(entry)
        last = raw[-1][0] if raw else (cursor or "0-0")
        return ReplayPage(entries, last, caught_up=len(raw) < limit)

    def _check_kept(self, cursor: str, info: dict[str, Any] | None) -> None:
        """Raise `CursorExpired` if an entry after ``cursor`` may have been trimmed away."""
        position = _position(cursor)
        if info is None:
            # No stream: it expired an hour after its last write, or Redis lost it. Either way
            # whatever followed the cursor is no longer here.
            if position > (0, 0):
                raise CursorExpired(f"cursor {cursor!r} is older than the realtime tier keeps")
            return
        # Trimmed past the cursor (Redis 7 tells), or so old that it may have been.
        deleted = info.get("max-deleted-entry-id")
        trimmed = deleted is not None and position < _position(str(deleted))
        if trimmed or position[0] < self._clock.now_ms() - REALTIME_TTL_MS:
            raise CursorExpired(f"cursor {cursor!r} is older than the realtime tier keeps")

    async def cursor_at(self, channel: ChannelRef, time_ms: int) -> str:
        # Stream ids start with Redis's own clock in ms: best effort across clocks.
        return f"{time_ms - 1}-{2**64 - 1}" if time_ms > 0 else "0-0"

    def live_feed(self) -> LiveFeed:
        return _RedisFeed(self)

    async def channels(self) -> list[ChannelRef]:
        since = self._clock.now_ms() - REALTIME_TTL_MS
        names = await self._r.zrangebyscore(self._registry, f"({since}", "+inf")
        return sorted(_channel(name) for name in names)

    async def sweep_expired(self, now_ms: int) -> int:
        """Redis expires the records, and the keys of idle channels, by itself; each write
        trims its channel's indexes, and readers skip what the (injectable) clock says has
        expired. What is left is the registry: forget channels idle for longer than the TTL.
        One call whatever the number of channels."""
        cutoff = now_ms - REALTIME_TTL_MS
        return int(await self._r.zremrangebyscore(self._registry, "-inf", cutoff))

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        name = f"{self._prefix}claim:{key.workspace_id}/{key.user_id}/{key.client_message_id}"
        value = json.dumps([claim.message_id, claim.timestamp, claim.fingerprint])
        held = await self._r.set(name, value, nx=True, px=ttl_ms, get=True)
        if held is None:
            return claim
        message_id, timestamp, fingerprint = json.loads(held)
        return SendClaim(message_id, int(timestamp), fingerprint)

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        if not requests:
            return 0.0
        # One hash tag for every bucket: a Lua call's keys must share a cluster slot.
        keys = [f"{self._prefix}{{limits}}:{r.key}" for r in requests]
        args = [repr(float(v)) for r in requests for v in (r.cost, r.rate_per_s, r.burst)]
        return float(await self._take_script(keys=keys, args=args))

    def _events_key(self, workspace_id: str) -> str:
        return f"{self._prefix}events:{workspace_id}"

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        data = json.dumps(event.to_wire(), ensure_ascii=False, separators=(",", ":"))
        key = self._events_key(workspace_id)
        async with self._r.pipeline(transaction=True) as pipe:
            # Listeners read new entries within a second or so: a short tail is plenty.
            pipe.xadd(key, {"data": data}, maxlen=_EVENTS_KEPT, approximate=True)
            pipe.pexpire(key, REALTIME_TTL_MS)
            await pipe.execute()

    async def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        # One connection per watched workspace per process, blocking in XREAD on its stream:
        # workspaces are few beside channels (whose messages share a reader per thousand).
        key = self._events_key(workspace_id)
        last = await self._r.xrevrange(key, "+", "-", count=1)
        position = last[0][0] if last else "0-0"
        listener: Any = self.reader_connection()
        try:
            while True:
                batches = await listener.xread({key: position}, count=500, block=_BLOCK_MS)
                for _, entries in batches or ():
                    for entry_id, fields in entries:
                        position = entry_id
                        yield LiveEvent.from_wire(json.loads(fields["data"]))
        finally:
            await listener.aclose()


def _name(channel: ChannelRef) -> str:
    return f"{channel.workspace_id}/{channel.channel_id}"


def _channel(name: str) -> ChannelRef:
    # ws/ch -- ids cannot hold "/", so the split is exact.
    return ChannelRef(*name.split("/", 1))


def _position(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class _Reader:
    """One connection blocking in XREAD over a share of the watched channels' streams."""

    def __init__(self, feed: _RedisFeed) -> None:
        self.feed = feed
        self.positions: dict[ChannelRef, str] = {}
        self._changed = asyncio.Event()
        self._blocked_id: int | None = None
        self._closed = False
        self.task = asyncio.create_task(self._run())

    async def close(self) -> None:
        # A flag as well as a cancel: a cancel that lands as redis-py's read times out can come
        # out as a TimeoutError (asyncio.timeout in Python 3.11), which the loop would retry.
        self._closed = True
        self._wake()
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=5)

    def add(self, channel: ChannelRef, position: str) -> None:
        self.positions[channel] = position
        self._wake()

    def remove(self, channel: ChannelRef) -> None:
        self.positions.pop(channel, None)

    def _wake(self) -> None:
        """A blocked XREAD does not see a new stream: unblock it to start again with it."""
        self._changed.set()
        if self._blocked_id is not None:
            self.feed.unblock(self._blocked_id)

    async def _run(self) -> None:
        tier = self.feed.tier
        connection = tier.reader_connection()
        client_id: int | None = None  # asked again after a failure: a reconnect changes it
        failures = 0
        try:
            while not self._closed:
                if not self.positions:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                watched = dict(self.positions)
                keys = {tier.stream_key(channel): channel for channel in watched}
                try:
                    if client_id is None:
                        client_id = int(await connection.client_id())
                    self._blocked_id = client_id
                    self._changed.clear()
                    reply = await connection.xread(
                        {k: watched[c] for k, c in keys.items()}, count=_PER_STREAM, block=_BLOCK_MS
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    # The positions stay: once Redis answers again, nothing is skipped.
                    failures += 1
                    client_id = None
                    if failures == 1:
                        log.warning("live reader failed, retrying: %r", error)
                    await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                    continue
                finally:
                    self._blocked_id = None
                failures = 0
                self._dispatch(keys, reply or ())
        finally:
            await connection.aclose()

    def _dispatch(self, keys: dict[str, ChannelRef], reply: Any) -> None:
        entries: list[LiveEntry] = []
        for key, stream_entries in reply:
            channel = keys[key]
            if channel not in self.positions:
                continue  # unwatched while the read was out
            for entry_id, fields in stream_entries:
                self.positions[channel] = entry_id
                entry = self.feed.tier.decode_entry(channel, entry_id, fields)
                if entry is not None:
                    entries.append(entry)
        if entries:
            self.feed.out.put_nowait(entries)


class _RedisFeed:
    """Every watched channel of a process, over ceil(channels / streams_per_read) readers."""

    def __init__(self, tier: RedisRealtimeTier) -> None:
        self.tier = tier
        self.out: asyncio.Queue[list[LiveEntry]] = asyncio.Queue()
        self._readers: list[_Reader] = []
        self._reader_of: dict[ChannelRef, _Reader] = {}
        self._unblocks: set[asyncio.Task[Any]] = set()
        self._heads: Coalescer[ChannelRef] = Coalescer(
            self._place_many, self._place_one, max_batch=500, max_in_flight=2
        )

    async def watch(self, channel: ChannelRef) -> None:
        if channel not in self._reader_of:
            await self._heads.submit(channel)

    async def _place_one(self, channel: ChannelRef) -> None:
        await self._place_many([channel])

    async def _place_many(self, channels: Sequence[ChannelRef]) -> None:
        """Fix each channel's position at its stream's last entry: in place, as every later
        write gets a greater id. Concurrent watches (a restart's reconnects) share a pipeline
        and take few pooled connections from the sends."""
        async with self.tier._r.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.xrevrange(self.tier.stream_key(channel), "+", "-", count=1)
            lasts = await pipe.execute()
        for channel, last in zip(channels, lasts, strict=True):
            if channel not in self._reader_of:
                self._follow(channel, last[0][0] if last else "0-0")

    def _follow(self, channel: ChannelRef, position: str) -> None:
        reader = next(
            (r for r in self._readers if len(r.positions) < self.tier.streams_per_read), None
        )
        if reader is None:
            reader = _Reader(self)
            self._readers.append(reader)
        self._reader_of[channel] = reader
        reader.add(channel, position)

    def unwatch(self, channel: ChannelRef) -> None:
        reader = self._reader_of.pop(channel, None)
        if reader is not None:
            reader.remove(channel)

    def unblock(self, client_id: int) -> None:
        task = asyncio.create_task(self.tier._r.client_unblock(client_id))
        self._unblocks.add(task)
        # Best effort (an ACL may forbid it): a new channel then waits one BLOCK at most.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task.add_done_callback(self._unblocks.discard)

    async def next_entries(self) -> list[LiveEntry]:
        return await next_batches(self.out)

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self._readers), return_exceptions=True)
        for task in self._unblocks:
            task.cancel()
        await asyncio.gather(*self._unblocks, return_exceptions=True)
        self._readers.clear()


def create(url: str, context: BackendContext) -> RealtimeTier:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "dualwrite:")
    max_connections = int(query.pop("max_connections", "64"))
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    return RedisRealtimeTier(
        clean,
        prefix,
        context.clock,
        context.realtime_timeout_s,
        context.live_streams_per_read,
        max_connections,
    )
