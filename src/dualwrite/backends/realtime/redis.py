"""Redis realtime tier, with redis-py's asyncio client, on a single Redis or a Redis Cluster.

- `redis://host:port/db?prefix=dualwrite:` (`rediss://`: TLS): one Redis (or a primary).
- `redis+cluster://host:port[,host:port...]?prefix=dualwrite:` (`rediss+cluster://`: TLS, and
  `user:password@` as usual): a Redis Cluster through redis-py's `RedisCluster`. Each listed
  node is a seed (list several: any one that answers gives the slot map); db must be 0.
One module for both: where a cluster differs the code says so (`self.cluster`).

Per channel, under the one hash tag `{ws/ch}`, so that on a cluster all of a channel's keys
live in its slot (what its Lua calls and multi-key reads require):
- `{prefix}{ws/ch}:msg:{id}`: the record (JSON), expiring by Redis's own TTL at `ttl`;
- `{prefix}{ws/ch}:index`: a sorted set of the channel's ids, for reads in id order;
- `{prefix}{ws/ch}:time`: a sorted set of the ids scored by send time (ties in id order, as
  Redis orders equal scores by member), read by bounded reverse ranges for history pages;
- `{prefix}{ws/ch}:unconfirmed`: the same, for the messages not yet confirmed saved; the
  reconciler reads only this;
- `{prefix}{ws/ch}:stream`: a stream of every write, trimmed to the last hour. Its entry ids
  are the live cursors: they follow write order (a rewrite is a new entry), and a client that
  resumes after one misses nothing (pub/sub would). `max-deleted-entry-id` tells a cursor whose
  successors were trimmed away (`CursorExpired`);
- cluster only: `{prefix}{ws/ch}:wake`, a sharded pub/sub channel (it hashes like a key: the
  same slot) on which the write script SPUBLISHes each new entry's id.
Elsewhere, one key each: `{prefix}channels` (the registry), `{prefix}{unconfirmed}:channels`
(the channels holding marks) and beside it, in the same slot, `{prefix}{unconfirmed}:writes` (a
hash of each listed channel's listing generation and writes in flight), `{prefix}events:{ws}`
(a short stream of a workspace's live events, "saved" and "channel", read like a channel's, so
a listener between two blocking reads misses none), `{prefix}claim:...` (idempotency keys), and
the rate-limit buckets `{prefix}{limits}:...`, which share the `{limits}` slot because one Lua
call takes from several.

A write touches all of a channel's keys in one Lua call, so a reader never sees half of it;
concurrent writes travel together in one pipeline. `{prefix}channels` (scored by last write)
lists the channels, so inspect and the sweep never scan the keyspace; it is written before the
script (it lives in another slot), so a channel is listed no later than its messages.
`{prefix}{unconfirmed}:channels` lists the channels that hold marks, scored by their oldest
mark (or earlier): a write lists its channel before its script (counting itself in flight) and
after it (no longer), and a channel leaves the list only if no write was in flight, a check of
its marks finds none, and no write listed it meanwhile (`_settle_now`), so a reconcile round
visits what is unsaved, never every active channel. A single Redis runs a pipeline in order; a
cluster pipeline sends each node its share at once, so there each step whose order matters
(registry, scripts, list of marked channels) is a pipeline of its own, awaited before the next
(`_in_order`), and concurrent writes are batched per primary, so that a batch fails with its
own node only. Redis expires records and idle channels' keys by itself (each write trims the
indexes and renews their TTL); the sweep only trims the registry. Every call is bounded by the
realtime timeout.

Live delivery is one `LiveFeed` per process.
- Single Redis: a few readers, each one connection blocking in XREAD over up to
  `live_streams_per_read` streams at once.
- Cluster: XREAD may only name keys of one slot (CROSSSLOT), and a blocking connection per
  channel (a slot each) would not scale. So the write script also SPUBLISHes the entry id on
  the channel's `:wake`; the feed keeps one subscriber connection per primary (an SSUBSCRIBE
  per watched channel: Redis refuses one over several slots) and one reading task, which reads
  the channels woken, each from its position, by non-blocking XREADs sent as one pipeline
  (one batch per node). Per message and process: one pushed wake-up and one XREAD, whatever
  the number of channels. The wake-up is only a hint: a position moves only as entries are
  handed on, a read follows every (re)confirmed subscription, and every watched stream is
  read once a second (`_POLL_S`) whatever the wake-ups said, so a lost wake-up delays an
  entry by a second at most, never loses it (at least once, as on a single Redis). The
  subscribers follow the slot map: a MOVED answer to SSUBSCRIBE, the server's own SUNSUBSCRIBE
  (the slot migrated, the node was demoted) or a failed connection (a failover) makes the
  feed read the slot map again and subscribe on the node serving the slot now, then read what
  came meanwhile. Commands follow MOVED and ASK through redis-py.
- Cluster failover (a primary dies; its replica is promoted after `cluster-node-timeout` and
  an election, a few seconds): writes to its slots fail with the usual "Retry?" meanwhile,
  and, once the cluster marks it failed, so do writes to every slot until the promotion
  (Redis refuses all slots while one is uncovered, unless `cluster-require-full-coverage no`).
  A promoted replica may lack the write script: EVALSHA answers NOSCRIPT and the script is
  loaded on every primary. Replication is asynchronous, so an entry the dead primary had
  acknowledged may be missing from the realtime tier afterwards; its message is in the
  permanent store (a send is acknowledged after the permanent write, or its queueing).
- Resharding: while a channel's slot migrates, its writes are refused with TRYAGAIN (they
  create a key, which Redis Cluster refuses for multi-key calls mid-migration); redis-py
  retries a moment, then the send fails with the usual "Retry?".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dualwrite._coalesce import Coalescer
from dualwrite.backends import BackendContext
from dualwrite.backends._batches import next_batches
from dualwrite.clock import Clock
from dualwrite.errors import BackendUnavailable, BadSetting, CursorExpired, InvalidInput
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
if ARGV[9] == '1' and redis.call('GET', KEYS[1]) == ARGV[2] then return false end
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
if ARGV[8] ~= '' then redis.call('SPUBLISH', ARGV[8], sid) end
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

# The list of marked channels and its companion hash share the `{unconfirmed}` slot, so that
# each listing and each settling decision is one atomic call. In the hash, per channel name:
# `g:` a generation, bumped by every listing; `i:` writes between their two listings (in
# flight, or dead there); `t:` when the last write listed it first (the tier's clock, ms).
# ARGV: now, then name, score, count per channel.
_LIST_BEFORE = """
for j = 2, #ARGV, 3 do
  local name = ARGV[j]
  redis.call('ZADD', KEYS[1], 'LT', ARGV[j + 1], name)
  redis.call('HINCRBY', KEYS[2], 'g:' .. name, 1)
  redis.call('HINCRBY', KEYS[2], 'i:' .. name, ARGV[j + 2])
  redis.call('HSET', KEYS[2], 't:' .. name, ARGV[1])
end
"""

_LIST_AFTER = """
for j = 1, #ARGV, 3 do
  local name = ARGV[j]
  redis.call('ZADD', KEYS[1], 'LT', ARGV[j + 1], name)
  redis.call('HINCRBY', KEYS[2], 'g:' .. name, 1)
  if redis.call('HINCRBY', KEYS[2], 'i:' .. name, -tonumber(ARGV[j + 2])) <= 0 then
    redis.call('HDEL', KEYS[2], 'i:' .. name)
  end
end
"""

# Per channel (name, generation read before, "" for none): unless listed since, take it off
# the list and forget it.
_FORGET = """
for j = 1, #ARGV, 2 do
  local name = ARGV[j]
  if (redis.call('HGET', KEYS[2], 'g:' .. name) or '') == ARGV[j + 1] then
    redis.call('ZREM', KEYS[1], name)
    redis.call('HDEL', KEYS[2], 'g:' .. name, 'i:' .. name, 't:' .. name)
  end
end
"""

# Per channel (name, generation read before, score): unless listed since, list it at score.
_DEFER = """
for j = 1, #ARGV, 3 do
  if (redis.call('HGET', KEYS[2], 'g:' .. ARGV[j]) or '') == ARGV[j + 1] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[j + 2], ARGV[j])
  end
end
"""

_STUCK_MS = 60_000
"""A write between its two listings for longer than this is taken for dead there."""
_DEFER_MS = 300_000
"""How long a channel held listed only by writes taken for dead waits to be visited again."""
_BLOCK_MS = 1000
_CHANNELS_PER_ROUND = 10_000
"""Channels with due marks one reconcile round takes at most (the oldest first)."""
_CHANNELS_PER_PIPELINE = 100
"""Channels a pipeline of the reconcile round or of settling covers at most: redis-py parses a
pipeline's replies in one go, and 1,000 channels' held the process for 70 ms, during which no
socket was written to and no send went on."""
_EVENTS_KEPT = 1000
_PER_STREAM = 500
"""Entries one XREAD takes from each stream."""
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
_SETTLE_AFTER_S = 1.0
"""Channels a confirm left without marks are taken off the unconfirmed list this soon after."""
_POLL_S = 1.0
"""Cluster: every watched stream is read this often, whatever the wake-ups said."""
_IDLE_S = 5.0
"""Cluster: a wake-up connection silent this long is sent a PING; one more such wait without
an answer and it is replaced."""


async def _run_script(script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run a registered script. redis-py reloads one that Redis lost (restart, SCRIPT FLUSH, a
    promoted replica) and runs it again, once; lost again in between (flushes close together),
    it is sent whole with EVAL, which no flush can race. NOSCRIPT means it did not run, so
    running it again writes nothing twice."""
    try:
        return await script(keys=keys, args=args)
    except NoScriptError:
        client = script.registered_client
        return await client.eval(script.script, len(keys), *keys, *args)


class RedisRealtimeTier:
    def __init__(
        self,
        url: str,
        prefix: str,
        clock: Clock,
        timeout_s: float,
        streams_per_read: int,
        max_connections: int = 64,
        cluster: bool = False,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._clock = clock
        self.timeout_s = timeout_s
        self._max_connections = max_connections
        self.streams_per_read = streams_per_read
        self.cluster = cluster
        self._options: dict[str, Any] = {}
        self._redis: aioredis.Redis | RedisCluster | None = None
        self._write_script: Any = None
        self._take_script: Any = None
        self._read_before_script: Any = None
        self._writes = self._write_batches()
        # Cluster: a batch per primary, so that a batch fails with its node and only then
        # (a write to a node being failed over does not take writes to the others with it).
        self._writes_to: dict[str, Coalescer[tuple[ChannelRef, RealtimeMessage]]] = {}
        # Channels whose marks a confirm cleared, taken off the list by `_settle_emptied`.
        self._emptied: set[ChannelRef] = set()
        self._settling: asyncio.Task[None] | None = None
        # Every saved send clears its mark: concurrent ones share one pipeline.
        self._confirms: Coalescer[tuple[ChannelRef, tuple[str, ...]]] = Coalescer(
            self._confirm_many, self._confirm_one, max_batch=256, max_in_flight=8
        )

    async def connect(self) -> None:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": max(self.timeout_s, _BLOCK_MS / 1000 * 2),
            "socket_connect_timeout": self.timeout_s,
            "health_check_interval": 30,
        }
        self._options = options
        try:
            if self.cluster:
                # A pool per node, of at most max_connections; the slot map is read from the
                # first node that answers and refreshed on MOVED and on failures.
                self._redis = _cluster_client(self._url, self._max_connections, options)
                await self._redis.initialize()
            else:
                # Commands wait (up to the call timeout) for one of a bounded set of
                # connections, rather than failing when a burst of sends outnumbers them.
                pool = aioredis.BlockingConnectionPool.from_url(
                    self._url,
                    max_connections=self._max_connections,
                    timeout=self.timeout_s,
                    **options,
                )
                self._redis = aioredis.Redis(connection_pool=pool)
            self._write_script = self._redis.register_script(_WRITE)
            self._take_script = self._redis.register_script(_TAKE)
            self._read_before_script = self._redis.register_script(_READ_BEFORE)
            # On a cluster, SCRIPT LOAD goes to every primary.
            await self._redis.script_load(_WRITE)
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as exc:
            # Without the realtime tier no send can succeed: say so in one line, not a driver
            # traceback. (The caller closes what connect opened.)
            what = "Redis Cluster" if self.cluster else "Redis"
            raise BackendUnavailable(
                f"cannot reach {what} at {redact_url(self._url)} ({one_line(exc)}): "
                "sends fail until it answers"
            ) from exc

    async def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
            await asyncio.gather(self._settling, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
        self._redis = None

    def reader_connection(self, key: str | None = None) -> Any:
        """A connection of its own for a live reader: a blocking XREAD never holds a pooled
        connection the writes need. On a cluster, to the primary serving ``key``'s slot now
        (a reader that meets an error asks again: the slot may have moved)."""
        if not self.cluster:
            return aioredis.Redis.from_url(
                self._url, single_connection_client=True, **self._options
            )
        assert key is not None, "a cluster reader reads one slot: name a key of it"
        node = self._r.get_node_from_key(key)
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, **node.connection_kwargs
        )
        return aioredis.Redis(connection_pool=pool, single_connection_client=True)

    def stream_key(self, channel: ChannelRef) -> str:
        return self._key(channel, "stream")

    def wake_key(self, channel: ChannelRef) -> str:
        """Cluster: the sharded pub/sub channel the write script wakes the channel's readers
        on, in the channel's slot (a shard channel hashes like a key)."""
        return self._key(channel, "wake")

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
        return f"{self._prefix}{{unconfirmed}}:channels"

    @property
    def _unconfirmed_writes(self) -> str:
        return f"{self._prefix}{{unconfirmed}}:writes"

    def _listing(self, pipe: Any, script: str, args: Sequence[Any]) -> None:
        """One call of a small script on the `{unconfirmed}` slot (EVAL: no script to reload)."""
        keys = (self._unconfirmed_channels, self._unconfirmed_writes)
        pipe.execute_command("EVAL", script, len(keys), *keys, *args)

    def _write_batches(self) -> Coalescer[tuple[ChannelRef, RealtimeMessage]]:
        return Coalescer(
            self._write_many,
            self._write_one,
            max_batch=256,
            max_in_flight=8,
            commit_retry=functools.partial(self._write_one, once=True),
        )

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        writes = self._writes
        if self.cluster:
            node = self._r.get_node_from_key(self.stream_key(channel)).name
            if node not in self._writes_to:
                self._writes_to[node] = self._write_batches()
            writes = self._writes_to[node]
        await writes.submit((channel, message))

    def _script_call(
        self, channel: ChannelRef, message: RealtimeMessage, once: bool = False
    ) -> dict[str, Any]:
        """The write script's keys and arguments; ``once``: a no-op if this very record is
        there already (a retry of a write that a failed batch may have run: a rewrite, by
        contract, comes again)."""
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
                self.wake_key(channel) if self.cluster else "",
                "1" if once else "",
            ],
        }

    def _register(self, pipe: Any, items: Sequence[tuple[ChannelRef, RealtimeMessage]]) -> None:
        latest: dict[str, int] = {}
        for channel, message in items:
            name = _name(channel)
            latest[name] = max(latest.get(name, 0), message.timestamp)
        pipe.zadd(self._registry, latest, gt=True)
        # Listed before the marks as well as after, and counted in flight in between: a write
        # cut off (or its process killed) between its script and the listing after it still
        # leaves its channel listed, and settling leaves alone a channel with writes in flight.
        self._list_unconfirmed(pipe, items, before=True)

    def _list_unconfirmed(
        self, pipe: Any, items: Sequence[tuple[ChannelRef, RealtimeMessage]], before: bool
    ) -> None:
        # Around the marks: see `_settle_now` for why.
        oldest: dict[str, int] = {}
        count: dict[str, int] = collections.Counter()
        for channel, message in items:
            name = _name(channel)
            oldest[name] = min(oldest.get(name, message.timestamp), message.timestamp)
            count[name] += 1
        args = [a for name, o in oldest.items() for a in (name, o, count[name])]
        if before:
            self._listing(pipe, _LIST_BEFORE, [self._clock.now_ms(), *args])
        else:
            self._listing(pipe, _LIST_AFTER, args)

    async def _write_one(
        self, item: tuple[ChannelRef, RealtimeMessage], once: bool = False
    ) -> None:
        # As a batch of one first: on a single Redis one round trip, where the steps below
        # take three (a lone send is the common case below a few hundred sends a second).
        try:
            await self._write_many([item], once)
        except NoScriptError:
            # Redis lost the script (restart, SCRIPT FLUSH, a promoted replica): its listings
            # ran, and ran again below, which is harmless (the count in flight is back to
            # where it was); the script did not.
            await self._write_reloading(item, once)

    async def _write_reloading(
        self, item: tuple[ChannelRef, RealtimeMessage], once: bool = False
    ) -> None:
        await self._in_order(lambda pipe: self._register(pipe, [item]))
        try:
            # Script.__call__ reloads the script if Redis lost it (restart, SCRIPT FLUSH, a
            # replica promoted by a failover): on a cluster, on every primary.
            await _run_script(self._write_script, **self._script_call(*item, once))
        except ResponseError:
            # Refused, so surely not run: the write is no longer in flight. (Cut off, it may
            # still run: it stays counted in flight, and its channel listed.)
            await self._in_order(lambda pipe: self._list_unconfirmed(pipe, [item], before=False))
            raise
        await self._in_order(lambda pipe: self._list_unconfirmed(pipe, [item], before=False))

    async def _write_many(
        self, items: Sequence[tuple[ChannelRef, RealtimeMessage]], once: bool = False
    ) -> None:
        """Concurrent writes in one pipeline: one round trip, each still one atomic script.
        If any fails (NOSCRIPT after a restart, say) the caller retries them one by one, each
        ``once``: the others ran."""

        def scripts(pipe: Any) -> None:
            for item in items:
                call = self._script_call(*item, once)
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses that
                # method, though it routes EVALSHA by its keys' slot.
                keys, args = call["keys"], call["args"]
                pipe.execute_command("EVALSHA", self._write_script.sha, len(keys), *keys, *args)

        # The list of marked channels around the marks: see `_settle_now`.
        await self._in_order(
            lambda pipe: self._register(pipe, items),
            scripts,
            lambda pipe: self._list_unconfirmed(pipe, items, before=False),
        )

    async def _in_order(self, *steps: Callable[[Any], None]) -> None:
        """Run each step's commands after the previous step's have run. A single Redis runs a
        pipeline in order: one round trip. A cluster pipeline sends each node its share at
        once, so nodes run theirs concurrently: there, one pipeline per step, each awaited. A
        step answered with an error ends the sequence, except that once a middle step (the
        scripts) was answered, even with errors, the last one (the listing that ends the
        writes' time in flight) still runs; then the first error is raised."""
        if not self.cluster:
            async with self._r.pipeline(transaction=False) as pipe:
                for step in steps:
                    step(pipe)
                await pipe.execute()
            return
        for number, step in enumerate(steps):
            async with self._r.pipeline(transaction=False) as pipe:
                step(pipe)
                replies = await pipe.execute(raise_on_error=False)
            error = next((r for r in replies if isinstance(r, Exception)), None)
            if error is None:
                continue
            if 0 < number < len(steps) - 1:
                async with self._r.pipeline(transaction=False) as pipe:
                    steps[-1](pipe)
                    await pipe.execute()
            raise error

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
            text = await _run_script(
                self._read_before_script,
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
        # The oldest first, and at most a round's worth: after an outage over many channels a
        # round stays within its bound, and the next one takes the following ones.
        names = await self._r.zrangebyscore(
            self._unconfirmed_channels, "-inf", sent_until_ms, start=0, num=_CHANNELS_PER_ROUND
        )
        channels = [_channel(name) for name in names]
        oldest = await self._oldest_marks(channels)
        due = [o is not None and o <= sent_until_ms for o in oldest]
        # A channel listed with no mark that old is put back at its oldest mark (or dropped):
        # the next round does not visit it again before that mark is due.
        await self._settle(
            [c for c, d in zip(channels, due, strict=True) if not d],
            [o for o, d in zip(oldest, due, strict=True) if not d],
        )
        return [c for c, d in zip(channels, due, strict=True) if d]

    async def _settle(self, channels: Sequence[ChannelRef], oldest: Sequence[int | None]) -> None:
        """List ``channels`` at their oldest mark (``oldest``, as just read; None: no mark),
        or take them off the list if they hold none. Shielded: a caller whose bound runs out
        leaves it to finish, never half done."""
        for start in range(0, len(channels), _CHANNELS_PER_PIPELINE):
            end = start + _CHANNELS_PER_PIPELINE
            await asyncio.shield(self._settle_now(channels[start:end], oldest[start:end]))

    async def _settle_now(
        self, channels: Sequence[ChannelRef], oldest: Sequence[int | None]
    ) -> None:
        """Channels with marks are listed again in place, never removed. For those without:
        (A) read each one's generation and writes in flight; one with a write in flight is
        left listed; (C) check its marks again; (D) take it off the list only if its
        generation is still the one read in A (`_FORGET`, atomic on the list's slot).
        Why no mark is left unlisted: a write lists its channel (bumping the generation and
        counting itself in flight) before its mark and again after it (bumping it again and
        ending its flight). A write whose first listing comes after A changes the generation,
        so D leaves the channel. One whose first listing came before A, when none was in
        flight, had made its mark before A, which C sees. Each step is awaited in turn, so on
        a cluster too.

        A write that dies between its listings (killed, cut off) stays counted in flight:
        while its last first listing is recent (`_STUCK_MS`) the channel is simply left
        listed; after that it is taken for dead and the channel is listed `_DEFER_MS` ahead,
        so it costs a visit every few minutes, not every round; after the realtime TTL
        (its message expired, whether or not its script ran) its count is ignored and the
        channel removed as usual. A channel is thus forgotten at the latest an hour after its
        last write. What remains: a write whose script lands more than `_STUCK_MS` after its
        first listing (far past any timeout) and then dies before its second listing can see
        its mark reconciled up to `_DEFER_MS` late; one whose script lands later than the TTL
        leaves a mark nobody visits (its record has expired by then)."""
        marked = {_name(c): o for c, o in zip(channels, oldest, strict=True) if o is not None}
        empty = [c for c, o in zip(channels, oldest, strict=True) if o is None]
        if marked:
            await self._r.zadd(self._unconfirmed_channels, marked)
        if not empty:
            return
        # A: generation, writes in flight, last first listing.
        writes = self._unconfirmed_writes
        async with self._r.pipeline(transaction=False) as pipe:
            for channel in empty:
                name = _name(channel)
                pipe.hmget(writes, f"g:{name}", f"i:{name}", f"t:{name}")
            held = await pipe.execute()
        now = self._clock.now_ms()
        free: list[tuple[ChannelRef, str]] = []
        stuck: list[Any] = []
        for channel, (generation, in_flight, since) in zip(empty, held, strict=True):
            since_ms = int(since or 0)
            if int(in_flight or 0) <= 0 or since_ms < now - REALTIME_TTL_MS:
                free.append((channel, generation or ""))
            elif since_ms < now - _STUCK_MS:
                stuck += [_name(channel), generation or "", now + _DEFER_MS]
            # else: a write in flight: left listed as it is
        if stuck:
            async with self._r.pipeline(transaction=False) as pipe:
                self._listing(pipe, _DEFER, stuck)
                await pipe.execute()
        if not free:
            return
        # C: marks again (those made meanwhile are listed at their oldest, as usual).
        again = await self._oldest_marks([c for c, _ in free])
        late = {_name(c): o for (c, _), o in zip(free, again, strict=True) if o is not None}
        if late:
            await self._r.zadd(self._unconfirmed_channels, late, lt=True)
        # D: forget those still without marks, unless listed since A.
        gone = [
            a for (c, g), o in zip(free, again, strict=True) if o is None for a in (_name(c), g)
        ]
        if gone:
            async with self._r.pipeline(transaction=False) as pipe:
                self._listing(pipe, _FORGET, gone)
                await pipe.execute()

    async def _oldest_marks(self, channels: Sequence[ChannelRef]) -> list[int | None]:
        marks: list[int | None] = []
        for start in range(0, len(channels), _CHANNELS_PER_PIPELINE):
            async with self._r.pipeline(transaction=False) as pipe:
                for channel in channels[start : start + _CHANNELS_PER_PIPELINE]:
                    pipe.zrange(self._key(channel, "unconfirmed"), 0, 0, withscores=True)
                replies = await pipe.execute()
            marks += [int(r[0][1]) if r else None for r in replies]
        return marks

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
        # Channels left without marks are taken off the list together, within a second:
        # settling each at its confirm cost every send three more round trips, and leaving
        # them all to the reconcile round let the list outgrow what a round takes.
        self._emptied.update(
            c for (c, _), left in zip(items, replies[1::2], strict=True) if not left
        )
        if self._emptied and (self._settling is None or self._settling.done()):
            self._settling = asyncio.create_task(self._settle_emptied())

    async def _settle_emptied(self) -> None:
        await asyncio.sleep(_SETTLE_AFTER_S)
        channels, self._emptied = list(self._emptied), set()
        try:
            await asyncio.wait_for(self._settle(channels, [None] * len(channels)), self.timeout_s)
        except Exception as error:  # the reconcile round settles them instead
            log.debug("settling %d channels without marks failed: %r", len(channels), error)

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
        return _ClusterFeed(self) if self.cluster else _RedisFeed(self)

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
        return float(await _run_script(self._take_script, keys=keys, args=args))

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
        # Cluster: on the node serving the key now; after a failure (failover, a moved slot)
        # the caller opens a new iterator, which asks again.
        listener: Any = self.reader_connection(key)
        try:
            while True:
                batches = await listener.xread({key: position}, count=500, block=_BLOCK_MS)
                for _, entries in batches or ():
                    for entry_id, fields in entries:
                        position = entry_id
                        yield LiveEvent.from_wire(json.loads(fields["data"]))
        finally:
            # The pool too: on a cluster it was made for this listener alone.
            await listener.aclose(close_connection_pool=True)


def _name(channel: ChannelRef) -> str:
    return f"{channel.workspace_id}/{channel.channel_id}"


def _channel(name: str) -> ChannelRef:
    # ws/ch -- ids cannot hold "/", so the split is exact.
    return ChannelRef(*name.split("/", 1))


def _position(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _bulk(text: str) -> bytes:
    """``text`` as one RESP bulk string, as redis-py packs an argument."""
    data = text.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


_XREAD_HEAD = b"".join(
    _bulk(part) for part in ("XREAD", "COUNT", str(_PER_STREAM), "BLOCK", str(_BLOCK_MS), "STREAMS")
)


class _Reader:
    """One connection blocking in XREAD over a share of the watched channels' streams.

    The command is packed here, from each stream key packed once: redis-py packs all of an
    XREAD's 2n+6 arguments anew on every call, and a reader re-issues its XREAD after every
    wake, which at 100 streams a reader and 200 sends/s was a tenth of a busy process's CPU.
    """

    def __init__(self, feed: _RedisFeed) -> None:
        self.feed = feed
        self.positions: dict[ChannelRef, str] = {}
        self._packed_keys: dict[ChannelRef, bytes] = {}
        self._packed_positions: dict[ChannelRef, bytes] = {}
        self._channel_of: dict[str, ChannelRef] = {}
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
        key = self.feed.tier.stream_key(channel)
        self.positions[channel] = position
        self._packed_keys[channel] = _bulk(key)
        self._packed_positions[channel] = _bulk(position)
        self._channel_of[key] = channel
        self._wake()

    def remove(self, channel: ChannelRef) -> None:
        if self.positions.pop(channel, None) is not None:
            del self._packed_keys[channel]
            del self._packed_positions[channel]
            del self._channel_of[self.feed.tier.stream_key(channel)]

    def _wake(self) -> None:
        """A blocked XREAD does not see a new stream: unblock it to start again with it."""
        self._changed.set()
        if self._blocked_id is not None:
            self.feed.unblock(self._blocked_id)

    def _command(self) -> bytes:
        # Both dicts hold the same channels, inserted together: the keys and positions pair up.
        return b"".join(
            (
                b"*%d\r\n" % (6 + 2 * len(self._packed_keys)),
                _XREAD_HEAD,
                *self._packed_keys.values(),
                *self._packed_positions.values(),
            )
        )

    async def _run(self) -> None:
        client = self.feed.tier.reader_connection()
        client_id: int | None = None  # asked again after a failure: a reconnect changes it
        failures = 0
        try:
            while not self._closed:
                if not self.positions:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                try:
                    if client_id is None:
                        client_id = int(await client.client_id())
                    self._blocked_id = client_id
                    self._changed.clear()
                    read_from = dict(self.positions)
                    reply = await _xread(client, self._command())
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
                self._dispatch(reply or (), read_from)
        finally:
            await client.aclose()

    def _dispatch(self, reply: Any, read_from: dict[ChannelRef, str]) -> None:
        entries: list[LiveEntry] = []
        for key, stream_entries in reply:
            channel = self._channel_of.get(key)
            if channel is None or self.positions.get(channel) != read_from.get(channel):
                # Unwatched while the read was out, or watched again from a new position:
                # what the read found is from before that watch (the next read starts at it).
                continue
            for entry_id, fields in stream_entries:
                self.positions[channel] = entry_id
                self._packed_positions[channel] = _bulk(entry_id)
                entry = self.feed.tier.decode_entry(channel, entry_id, fields)
                if entry is not None:
                    entries.append(entry)
        if entries:
            self.feed.out.put_nowait(entries)


async def _xread(client: Any, command: bytes) -> Any:
    """The reply to a packed XREAD, on ``client``'s one connection."""
    if client.connection is None:
        await client.initialize()
    connection = client.connection
    try:
        await connection.send_packed_command(command)
        return await client.parse_response(connection, "XREAD")
    except BaseException:
        # A reply left half read would be taken for the next command's.
        await connection.disconnect()
        raise


class _Feed:
    """What both feeds share: the queue they fill, and each watch's starting position."""

    def __init__(self, tier: RedisRealtimeTier) -> None:
        self.tier = tier
        self.out: asyncio.Queue[list[LiveEntry]] = asyncio.Queue()
        self._heads: Coalescer[ChannelRef] = Coalescer(
            self._place_many, self._place_one, max_batch=500, max_in_flight=2
        )

    def _watched(self, channel: ChannelRef) -> bool:
        raise NotImplementedError

    def _follow(self, channel: ChannelRef, position: str) -> None:
        raise NotImplementedError

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
            if not self._watched(channel):
                self._follow(channel, last[0][0] if last else "0-0")

    async def next_entries(self) -> list[LiveEntry]:
        return await next_batches(self.out)


class _RedisFeed(_Feed):
    """Every watched channel of a process, over ceil(channels / streams_per_read) readers."""

    def __init__(self, tier: RedisRealtimeTier) -> None:
        super().__init__(tier)
        self._readers: list[_Reader] = []
        self._reader_of: dict[ChannelRef, _Reader] = {}
        self._unblocks: set[asyncio.Task[Any]] = set()

    async def watch(self, channel: ChannelRef) -> None:
        if channel not in self._reader_of:
            await self._heads.submit(channel)

    def _watched(self, channel: ChannelRef) -> bool:
        return channel in self._reader_of

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

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self._readers), return_exceptions=True)
        for task in self._unblocks:
            task.cancel()
        await asyncio.gather(*self._unblocks, return_exceptions=True)
        self._readers.clear()


class _ClusterFeed(_Feed):
    """Every watched channel of a process on a Redis Cluster (see the module docstring).

    One task reads: each round, one pipelined non-blocking XREAD per due channel, which
    redis-py's cluster pipeline sends as one batch per node. A channel is due when its
    wake-up arrives, after its subscription is (re)confirmed, when a read took a full page,
    and for everyone every `_POLL_S`. Positions only move as entries are handed on, so a
    missed or repeated wake-up costs a read, never an entry."""

    def __init__(self, tier: RedisRealtimeTier) -> None:
        super().__init__(tier)
        self.positions: dict[ChannelRef, str] = {}
        self._due: set[ChannelRef] = set()
        self._woken = asyncio.Event()
        self._subscribers: dict[str, _Subscriber] = {}
        self._subscriber_of: dict[ChannelRef, _Subscriber] = {}
        self._homeless: set[ChannelRef] = set()
        self._placing: asyncio.Task[None] | None = None
        self.placement_delay_s = 0.05
        """Grows while channels keep coming back unplaced; a confirmation resets it."""
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def watch(self, channel: ChannelRef) -> None:
        if channel not in self.positions:
            await self._heads.submit(channel)
        subscriber = self._subscriber_of.get(channel)
        if subscriber is None:
            return  # no node for its slot just now: read by the poll until placed
        # In place once its node confirms; a node slower than the call bound still has the
        # position: the poll reads from it.
        confirmed = subscriber.confirmation(channel)
        if confirmed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(confirmed), self.tier.timeout_s)

    def _watched(self, channel: ChannelRef) -> bool:
        return channel in self.positions

    def _follow(self, channel: ChannelRef, position: str) -> None:
        self.positions[channel] = position
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop())
        self._subscribe(channel)

    def _subscribe(self, channel: ChannelRef) -> None:
        """Hand the channel to the subscriber of the primary serving its slot now."""
        try:
            node = self.tier._r.get_node_from_key(self.tier.wake_key(channel))
        except RedisClusterException:  # slot not covered: mid-failover
            node = None
        if node is None:
            self._homeless.add(channel)
            return
        subscriber = self._subscribers.get(node.name)
        if subscriber is None:
            subscriber = self._subscribers[node.name] = _Subscriber(self, node)
        self._subscriber_of[channel] = subscriber
        subscriber.add(channel)

    def moved(self, channel: ChannelRef) -> None:
        """A subscriber gave ``channel`` up (its slot moved, its node failed over): place it
        again once the slot map is read afresh."""
        self._subscriber_of.pop(channel, None)
        if channel in self.positions:
            self._homeless.add(channel)
            self.wake(channel)
            if self._placing is None or self._placing.done():
                self._placing = asyncio.create_task(self._place_homeless())

    def gone(self, subscriber: _Subscriber) -> None:
        if self._subscribers.get(subscriber.node.name) is subscriber:
            del self._subscribers[subscriber.node.name]

    async def refresh_slots(self) -> None:
        """Read the slot map again (concurrent callers share one refresh). Best effort: the
        callers retry."""
        try:
            async with _turn(self.tier._r.gate):
                await asyncio.wait_for(
                    self.tier._r.nodes_manager.initialize(), self.tier.timeout_s * 2
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.debug("cluster slot map refresh failed: %r", error)

    async def _place_homeless(self) -> None:
        while self._homeless and not self._closed:
            # Backs off while a node keeps refusing what the slot map says it serves.
            await asyncio.sleep(self.placement_delay_s)
            self.placement_delay_s = min(2.0, self.placement_delay_s * 2)
            await self.refresh_slots()
            for channel in list(self._homeless):
                self._homeless.discard(channel)
                if channel in self.positions and channel not in self._subscriber_of:
                    self._subscribe(channel)

    def wake(self, channel: ChannelRef, entry_id: str | None = None) -> None:
        """Read ``channel`` soon (unless ``entry_id``, the write that woke it, was read)."""
        position = self.positions.get(channel)
        if position is None:
            return
        if (
            entry_id is not None
            and _STREAM_ID.fullmatch(entry_id)
            and _position(entry_id) <= _position(position)
        ):
            return
        self._due.add(channel)
        self._woken.set()

    def unwatch(self, channel: ChannelRef) -> None:
        self.positions.pop(channel, None)
        self._due.discard(channel)
        self._homeless.discard(channel)
        subscriber = self._subscriber_of.pop(channel, None)
        if subscriber is not None:
            subscriber.remove(channel)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + _POLL_S
        failures = 0
        while not self._closed:
            if not self._due:
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), max(0.0, next_poll - loop.time()))
            if loop.time() >= next_poll:
                # The safety net: a wake-up lost to a dropped connection or a moved slot.
                self._due.update(self.positions)
                next_poll = loop.time() + _POLL_S
                if self._homeless and (self._placing is None or self._placing.done()):
                    self._placing = asyncio.create_task(self._place_homeless())
            batch = {
                channel: self.positions[channel]
                for channel in list(self._due)[: self.tier.streams_per_read]
                if channel in self.positions
            }
            self._due.difference_update(batch)
            self._due.intersection_update(self.positions)
            if not batch:
                continue
            try:
                replies = await asyncio.wait_for(self._read(batch), self.tier.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                replies = [error] * len(batch)
            failed = None
            for (channel, position), reply in zip(batch.items(), replies, strict=True):
                if isinstance(reply, Exception):
                    failed = reply
                    self._due.add(channel)  # the position stays: nothing is skipped
                elif (
                    self.positions.get(channel) == position  # not re-watched meanwhile
                    and self._dispatch(channel, reply) >= _PER_STREAM
                ):
                    self._due.add(channel)  # a full page: more to read
            self._due.intersection_update(self.positions)
            if failed is None:
                failures = 0
                continue
            failures += 1
            if failures == 1:
                log.warning("live reader failed, retrying: %r", failed)
            await asyncio.sleep(min(2.0, 0.1 * 2**failures))

    async def _read(self, batch: dict[ChannelRef, str]) -> list[Any]:
        async with self.tier._r.pipeline(transaction=False) as pipe:
            for channel, position in batch.items():
                pipe.xread({self.tier.stream_key(channel): position}, count=_PER_STREAM)
            return list(await pipe.execute(raise_on_error=False))

    def _dispatch(self, channel: ChannelRef, reply: Any) -> int:
        """Hand on what one XREAD of one stream returned; how many entries it held."""
        entries: list[LiveEntry] = []
        count = 0
        for _, stream_entries in reply or ():  # [[stream, [(id, fields), ...]]]
            for entry_id, fields in stream_entries:
                count += 1
                self.positions[channel] = entry_id
                entry = self.tier.decode_entry(channel, entry_id, fields)
                if entry is not None:
                    entries.append(entry)
        if entries:
            self.out.put_nowait(entries)
        return count

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, self._placing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(s.close() for s in list(self._subscribers.values())), return_exceptions=True
        )
        self._subscribers.clear()
        self._subscriber_of.clear()


class _Subscriber:
    """One connection to one primary, subscribed (SSUBSCRIBE, one slot a command) to the
    wake-up channels of the watched channels whose slots that node serves.

    Replies come in command order, so each confirmation or error is matched to its command.
    A channel whose SSUBSCRIBE is answered MOVED, or that the server unsubscribes (its slot
    migrated, its node was demoted), goes back to the feed to be placed again. A failed
    connection is replaced; after a failure the slot map is read again and channels whose
    slot another primary now serves move there. Every (re)confirmed subscription is followed
    by a read of its channel, so nothing written meanwhile waits for the poll."""

    def __init__(self, feed: _ClusterFeed, node: ClusterNode) -> None:
        self.feed = feed
        self.node = node
        self.channels: dict[str, ChannelRef] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._sent: collections.deque[tuple[str, str]] = collections.deque()
        self._changed = asyncio.Event()
        self._queued: list[tuple[str, str]] = []
        self._confirmed_any = False
        self._closed = False
        self.task = asyncio.create_task(self._run())

    def add(self, channel: ChannelRef) -> None:
        wake = self.feed.tier.wake_key(channel)
        self.channels[wake] = channel
        self._confirmations[wake] = asyncio.get_running_loop().create_future()
        self._queued.append(("SSUBSCRIBE", wake))
        self._changed.set()

    def confirmation(self, channel: ChannelRef) -> asyncio.Future[None] | None:
        return self._confirmations.get(self.feed.tier.wake_key(channel))

    def remove(self, channel: ChannelRef) -> None:
        wake = self.feed.tier.wake_key(channel)
        if self.channels.pop(wake, None) is None:
            return
        self._settle(wake)
        self._queued.append(("SUNSUBSCRIBE", wake))
        self._changed.set()

    def _settle(self, wake: str) -> None:
        confirmed = self._confirmations.pop(wake, None)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    def _give_up(self, wake: str) -> None:
        """The channel's slot is not this node's (any more): back to the feed."""
        channel = self.channels.pop(wake, None)
        self._settle(wake)
        if channel is not None:
            self.feed.moved(channel)

    async def close(self) -> None:
        self._closed = True
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=5)
        for wake in list(self._confirmations):
            self._settle(wake)

    async def _run(self) -> None:
        failures = 0
        try:
            while self.channels and not self._closed:
                self._confirmed_any = False
                try:
                    await self._session()
                    continue  # it returned: nothing left to follow, unless added since
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    failures = 1 if self._confirmed_any else failures + 1
                    if failures == 1:
                        log.warning("live wake-ups from %s failed: %r", self.node.name, error)
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                # The node may be gone (a failover) or serve other slots now.
                await self.feed.refresh_slots()
                for wake in list(self.channels):
                    try:
                        node = self.feed.tier._r.get_node_from_key(wake)
                    except RedisClusterException:
                        node = None
                    if node is None or node.name != self.node.name:
                        self._give_up(wake)
        finally:
            self.feed.gone(self)
            for wake in list(self.channels):
                if self._closed:
                    self._settle(wake)
                else:
                    self._give_up(wake)

    async def _session(self) -> None:
        """One connection: subscribe every channel, then serve replies and changes until it
        fails, or nothing is left to follow (then return)."""
        # No retries inside redis-py (a silent reconnect would lose the subscriptions) and
        # no health check (its PING would read our replies): this loop does both.
        connection: Any = self.node.connection_class(
            **{
                **self.node.connection_kwargs,
                "retry": Retry(NoBackoff(), 0),
                "health_check_interval": 0,
            }
        )
        self._sent.clear()
        self._queued = [("SSUBSCRIBE", wake) for wake in self.channels]
        try:
            await asyncio.wait_for(connection.connect(), self.feed.tier.timeout_s)
            reading: asyncio.Task[Any] = asyncio.create_task(self._read(connection))
            changed: asyncio.Task[Any] | None = None
            pinged = False
            try:
                while self.channels or self._sent:
                    self._changed.clear()  # before: what is queued meanwhile sets it again
                    await self._send_queued(connection)
                    if changed is None or changed.done():
                        changed = asyncio.create_task(self._changed.wait())
                    done, _ = await asyncio.wait(
                        {reading, changed}, timeout=_IDLE_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    if reading in done:
                        reply = reading.result()  # raises what the read raised
                        reading = asyncio.create_task(self._read(connection))
                        pinged = False
                        self._handle(reply)
                    elif not done:  # silent for _IDLE_S
                        if pinged:
                            raise RedisTimeoutError(f"no answer from {self.node.name} to PING")
                        await connection.send_command("PING", check_health=False)
                        pinged = True
            finally:
                tasks = [t for t in (reading, changed) if t is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await connection.disconnect(nowait=True)

    async def _send_queued(self, connection: Any) -> None:
        queued, self._queued = self._queued, []
        for command, wake in queued:
            if command == "SSUBSCRIBE" and wake not in self.channels:
                continue  # unwatched before it was sent
            self._sent.append((command, wake))
            await connection.send_command(command, wake, check_health=False)

    @staticmethod
    async def _read(connection: Any) -> Any:
        try:
            return await connection.read_response(timeout=math.inf, push_request=True)
        except ResponseError as error:
            return error  # an answer to one command (MOVED...): the connection is fine

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, ResponseError):
            if not self._sent:
                raise reply
            command, wake = self._sent.popleft()
            if command == "SSUBSCRIBE" and wake in self.channels:
                log.info("live wake-up %s refused by %s: %r", wake, self.node.name, reply)
                self._give_up(wake)
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG
        kind, wake, data = str(reply[0]).lower(), str(reply[1]), reply[2]
        if kind == "smessage":
            channel = self.channels.get(wake)
            if channel is not None:
                self.feed.wake(channel, str(data))
        elif kind == "ssubscribe":
            if self._sent and self._sent[0] == ("SSUBSCRIBE", wake):
                self._sent.popleft()
            channel = self.channels.get(wake)
            if channel is not None:
                self._settle(wake)
                self._confirmed_any = True
                self.feed.placement_delay_s = 0.05
                self.feed.wake(channel)  # what was written before the subscription took
        elif kind == "sunsubscribe":
            if self._sent and self._sent[0] == ("SUNSUBSCRIBE", wake):
                self._sent.popleft()  # ours
            elif wake in self.channels:  # the server's: the slot is no longer this node's
                self._give_up(wake)


def _seeds(url: str) -> list[tuple[str, int]]:
    """The host:port pairs of a `redis+cluster://` URL's comma-separated node list."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or "]" in port:  # no port (an IPv6 address alone counts as no port)
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise BadSetting(f"{redact_url(url)}: {item!r} is not host:port")
        seeds.append((host, int(port)))
    return seeds


_HOLDING_A_TURN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dualwrite_redis_turn", default=False
)


@contextlib.asynccontextmanager
async def _turn(gate: asyncio.Semaphore) -> AsyncIterator[None]:
    """One of the gate's turns, unless this task holds one already (redis-py runs a
    pipeline's redirected commands one by one from inside the pipeline)."""
    if _HOLDING_A_TURN.get():
        yield
        return
    async with gate:
        held = _HOLDING_A_TURN.set(True)
        try:
            yield
        finally:
            _HOLDING_A_TURN.reset(held)


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose calls wait their turn as they do on a single Redis
    (`BlockingConnectionPool`): at most `max_connections` commands and pipelines at once, each
    taking at most one connection of each node, so no node's pool (of as many) runs out.
    redis-py's own cluster pools refuse a connection past their size at once
    (MaxConnectionsError), which would fail a burst of sends instead of queueing it."""

    gate: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with _turn(self.gate):
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused by redis-py
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py does


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        gate = self.cluster_client.gate  # type: ignore[attr-defined]
        async with _turn(gate):
            return await super().execute(raise_on_error, allow_redirections)


def _cluster_client(url: str, max_connections: int, options: dict[str, Any]) -> _Cluster:
    """redis-py's cluster client for `redis+cluster://[user:password@]host:port[,host:port...]`
    (`rediss+cluster://`: TLS). Every listed node is a seed; the first that answers gives the
    slot map. Query options other than ours go to redis-py, as for `redis://`."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    (host, port), *others = _seeds(url)
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    first = urlunsplit(parts._replace(scheme=scheme, netloc=f"{userinfo}{at}{_netloc(host, port)}"))
    client = cast(
        _Cluster,
        _Cluster.from_url(
            first,
            startup_nodes=[ClusterNode(h, p) for h, p in others],
            max_connections=max_connections,
            **options,
        ),
    )
    client.gate = asyncio.Semaphore(max_connections)
    return client


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create(url: str, context: BackendContext) -> RealtimeTier:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "dualwrite:")
    max_connections = int(query.pop("max_connections", "64"))
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    cluster = parts.scheme.endswith("+cluster")
    if cluster:
        _seeds(url)  # a malformed node list is a bad setting now, not at connect
    return RedisRealtimeTier(
        clean,
        prefix,
        context.clock,
        context.realtime_timeout_s,
        context.live_streams_per_read,
        max_connections,
        cluster=cluster,
    )
