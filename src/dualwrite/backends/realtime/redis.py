"""Redis realtime tier (`redis://host:port/db?prefix=dualwrite:`), with redis-py's asyncio client.

Per channel, under one hash tag so a cluster keeps them on one slot:
- `{prefix}{ws/ch}:msg:{id}`: the record (JSON), expiring by Redis's own TTL at `ttl`;
- `{prefix}{ws/ch}:index`: a sorted set of the channel's ids, for reads in id order;
- `{prefix}{ws/ch}:time`: a sorted set of the ids scored by send time (ties in id order, as
  Redis orders equal scores by member), read by bounded reverse ranges for history pages;
- `{prefix}{ws/ch}:unconfirmed`: the same, for the messages not yet confirmed saved; the
  reconciler reads only this;
- `{prefix}{ws/ch}:stream`: a stream of every write, trimmed to the last hour, which live
  subscribers read from their last position, so a reconnect misses nothing (pub/sub would).
Per workspace, `{prefix}events:{ws}` is a short stream of live events ("saved", "channel"),
read the same way, so a listener between two blocking reads misses none.
A write touches all of them in one Lua call, so a reader never sees half of it; concurrent
writes travel together in one pipeline. `{prefix}channels` (scored by last write) lists the
channels, so the reconciler and the sweep never scan the keyspace; it is written just before
the script in the same pipeline (it lives on another slot), so a channel is listed no later
than its messages. Redis expires records by itself; the sweep only trims the indexes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dualwrite._coalesce import Coalescer
from dualwrite.backends import BackendContext
from dualwrite.backends._recent import RecentIds
from dualwrite.clock import Clock
from dualwrite.errors import BackendUnavailable
from dualwrite.ids import time_prefix
from dualwrite.logs import one_line
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, LiveEvent, RealtimeMessage
from dualwrite.ports import RealtimeTier, SendClaim, SendKey, TokenRequest
from dualwrite.redact import redact_url

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


class RedisRealtimeTier:
    def __init__(
        self, url: str, prefix: str, clock: Clock, timeout_s: float, max_connections: int = 64
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._clock = clock
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._redis: aioredis.Redis | None = None
        self._listen_redis: aioredis.Redis | None = None
        self._write_script: Any = None
        self._take_script: Any = None
        self._read_before_script: Any = None
        self._writes: Coalescer[tuple[ChannelRef, RealtimeMessage]] = Coalescer(
            self._write_many, self._write_one, max_batch=256, max_in_flight=8
        )
        # Every saved send clears its mark: concurrent ones share one pipeline.
        self._confirms: Coalescer[tuple[ChannelRef, str]] = Coalescer(
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
        # Live subscriptions block on XREAD; they get their own connections, so that they can
        # never starve the writes.
        self._listen_redis = aioredis.Redis.from_url(self._url, **options)
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
        for client in (self._redis, self._listen_redis):
            if client is not None:
                await client.aclose()
        self._redis = self._listen_redis = None

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
            name = f"{channel.workspace_id}/{channel.channel_id}"
            latest[name] = max(latest.get(name, 0), message.timestamp)
        pipe.zadd(self._registry, latest, gt=True)

    async def _write_one(self, item: tuple[ChannelRef, RealtimeMessage]) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            self._register(pipe, [item])
            await pipe.execute()
        # Script.__call__ reloads the script if Redis lost it (restart, SCRIPT FLUSH).
        await self._write_script(**self._script_call(*item))

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
        channels = await self.channels()
        found: list[ChannelRef] = []
        # One pipelined count per channel, a thousand to a round trip.
        for start in range(0, len(channels), 1000):
            chunk = channels[start : start + 1000]
            async with self._r.pipeline(transaction=False) as pipe:
                for channel in chunk:
                    pipe.zcount(self._key(channel, "unconfirmed"), "-inf", sent_until_ms)
                counts = await pipe.execute()
            found += [c for c, n in zip(chunk, counts, strict=True) if int(n)]
        return found

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        if len(message_ids) == 1:
            await self._confirms.submit((channel, message_ids[0]))
        elif message_ids:
            await self._r.zrem(self._key(channel, "unconfirmed"), *message_ids)

    async def _confirm_one(self, item: tuple[ChannelRef, str]) -> None:
        await self._r.zrem(self._key(item[0], "unconfirmed"), item[1])

    async def _confirm_many(self, items: Sequence[tuple[ChannelRef, str]]) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            for channel, message_id in items:
                pipe.zrem(self._key(channel, "unconfirmed"), message_id)
            await pipe.execute()

    async def subscribe(
        self, channel: ChannelRef, after_id: str | None = None
    ) -> AsyncIterator[RealtimeMessage]:
        stream = self._key(channel, "stream")
        # Take the stream position before reading the backlog: what is written in between
        # arrives twice at most, and `seen` drops the repeat.
        last = await self._r.xrevrange(stream, "+", "-", count=1)
        position = last[0][0] if last else "0-0"
        seen = RecentIds()
        if after_id is not None:
            for message in await self.read_since(channel, after_id, 1_000_000):
                seen.first_time(message.message_id)
                yield message
        while True:
            listener: Any = self._listen_redis
            batches = await listener.xread({stream: position}, count=500, block=_BLOCK_MS)
            for _, entries in batches or ():
                for entry_id, fields in entries:
                    position = entry_id
                    message = RealtimeMessage.from_wire(fields["id"], json.loads(fields["data"]))
                    if not message.expired(self._clock.now_ms()) and seen.first_time(
                        message.message_id
                    ):
                        yield message

    async def channels(self) -> list[ChannelRef]:
        since = self._clock.now_ms() - REALTIME_TTL_MS
        names = await self._r.zrangebyscore(self._registry, f"({since}", "+inf")
        # ws/ch -- ids cannot hold "/", so the split is exact.
        return sorted(ChannelRef(*name.split("/", 1)) for name in names)

    async def sweep_expired(self, now_ms: int) -> int:
        """Redis expires the records by itself; this trims the indexes of what has expired
        (by the injectable clock) and forgets channels idle for longer than the TTL."""
        cutoff = now_ms - REALTIME_TTL_MS
        deleted = 0
        for channel in await self.channels():
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(self._key(channel, "time"), "-inf", cutoff)
                pipe.zremrangebyscore(self._key(channel, "unconfirmed"), "-inf", cutoff)
                pipe.zremrangebylex(self._key(channel, "index"), "-", f"[{time_prefix(cutoff)}")
                trimmed, _, _ = await pipe.execute()
            deleted += int(trimmed)
        await self._r.zremrangebyscore(self._registry, "-inf", cutoff)
        return deleted

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
        key = self._events_key(workspace_id)
        last = await self._r.xrevrange(key, "+", "-", count=1)
        position = last[0][0] if last else "0-0"
        while True:
            listener: Any = self._listen_redis
            batches = await listener.xread({key: position}, count=500, block=_BLOCK_MS)
            for _, entries in batches or ():
                for entry_id, fields in entries:
                    position = entry_id
                    yield LiveEvent.from_wire(json.loads(fields["data"]))


def create(url: str, context: BackendContext) -> RealtimeTier:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "dualwrite:")
    max_connections = int(query.pop("max_connections", "64"))
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    return RedisRealtimeTier(
        clean, prefix, context.clock, context.realtime_timeout_s, max_connections
    )
