"""Firebase Realtime Database tier (`firebase-rtdb://NAME.firebaseio.com`, or for an emulator
`firebase-rtdb://127.0.0.1:9000?ns=NAME`), with firebase-admin's `db` module (REST).

The layout is the story's (docs/story.md): `messages/{ws}/{ch}/{id}` =
{userId, userName, text, timestamp, ttl}. Beside it, `unconfirmed/{ws}/{ch}/{id}` = timestamp
marks a message not yet confirmed saved; it is set before the message, so every delivered
message has its mark, and the reconciler reads only these marks. History pages read
`order_by_child("timestamp")` with `limit_to_last` (needs `".indexOn": ["timestamp"]`).
firebase-admin blocks, so calls run in worker threads; live updates come from
`Reference.listen()` (server-sent events, on its own thread, reconnecting by itself) and are
handed to the event loop. Writes use `child(id).set()`, never `push()`: push is a POST the HTTP
client may retry, creating duplicates. Firebase has no expiry: `sweep_expired` deletes children
whose `ttl` passed (it needs `".indexOn": ["ttl"]`, see database.rules.json).
Live events ("saved", "channel") are children of `events/{ws}`, kept a few minutes.

Live cursors: the database keeps no write order, only ids, which follow creation order. A
message's cursor `w.{id}` therefore resumes with everything from `live_replay_window_ms` before
that id's time (the client drops ids it has), which covers concurrent senders and clock skew; a
"Retry?" that rewrites an id older than that window while the client is away is found in
history, not by resuming. The live feed listens to each watched channel (firebase-admin keeps
one thread per listener) and counts a channel as watched once its first snapshot arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import firebase_admin
from firebase_admin import db

from dualwrite.backends import BackendContext, _firebase_app
from dualwrite.backends._batches import next_batches
from dualwrite.backends._recent import RecentIds
from dualwrite.clock import Clock
from dualwrite.errors import CursorExpired, InvalidInput, UnknownBackend
from dualwrite.ids import PushIdGenerator, time_prefix, timestamp_of
from dualwrite.model import (
    REALTIME_TTL_MS,
    ChannelRef,
    LiveEntry,
    LiveEvent,
    RealtimeMessage,
    ReplayPage,
)
from dualwrite.ports import LiveFeed, RealtimeTier, SendClaim, SendKey, TokenRequest

T = TypeVar("T")
log = logging.getLogger(__name__)
_LIVENESS_CHECK_S = 5.0
_EVENT_TTL_MS = 300_000
_FIRST_SNAPSHOT_S = 30.0
_CURSOR = re.compile(r"([wa])\.([-0-9A-Za-z_]{1,20})")

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def database_url(url: str) -> tuple[str, bool]:
    """The https (or, for a local emulator, http) URL of a `firebase-rtdb://` URL."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise UnknownBackend(f"expected firebase-rtdb://HOST[?ns=NAME], got {url!r}")
    emulated = parts.hostname in _LOOPBACK or "FIREBASE_DATABASE_EMULATOR_HOST" in os.environ
    scheme = "http" if parts.hostname in _LOOPBACK else "https"
    query = f"?{parts.query}" if parts.query else ""
    if scheme == "http" and "ns" not in dict(parse_qsl(parts.query)):
        raise UnknownBackend(f"a local database URL needs ?ns=NAME: {url!r}")
    return f"{scheme}://{parts.netloc}{query}", emulated


class FirebaseRealtimeTier:
    def __init__(
        self, url: str, clock: Clock, timeout_s: float, threads: int, window_ms: int
    ) -> None:
        self._url, self._emulated = database_url(url)
        self._clock = clock
        self._timeout_s = timeout_s
        self._threads = threads
        self._window_ms = window_ms
        self._app: firebase_admin.App | None = None
        self._event_ids = PushIdGenerator(clock.now_ms)
        self._executor: ThreadPoolExecutor | None = None

    async def connect(self) -> None:
        # Its own threads: a call that timed out keeps its thread until httpTimeout (the
        # realtime bound), and must not hold up anything outside this tier meanwhile.
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="dualwrite-rtdb")
        self._app = _firebase_app.initialize(
            {"databaseURL": self._url, "httpTimeout": self._timeout_s}, emulated=self._emulated
        )

    async def close(self) -> None:
        _firebase_app.delete(self._app)
        self._app = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def ref(self, path: str) -> db.Reference:
        return self._ref(path)

    def _ref(self, path: str) -> db.Reference:
        return db.reference(path, app=self._app)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("FirebaseRealtimeTier is not connected")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args)
        )

    def _decode(self, message_id: str, data: Any) -> RealtimeMessage | None:
        if not isinstance(data, dict):
            return None
        try:
            message = RealtimeMessage.from_wire(message_id, data)
        except (KeyError, ValueError, TypeError):
            return None  # not a message (a client bypassing the rules): never delivered
        return None if message.expired(self._clock.now_ms()) else message

    def _marks(self, channel: ChannelRef) -> db.Reference:
        return self._ref(f"unconfirmed/{channel.workspace_id}/{channel.channel_id}")

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        # The mark first: a message that lands (even after its write timed out) has one.
        await self._run(self._marks(channel).child(message.message_id).set, message.timestamp)
        ref = self._ref(channel.realtime_path).child(message.message_id)
        await self._run(ref.set, message.to_wire())

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        data = await self._run(self._ref(channel.realtime_path).child(message_id).get)
        return self._decode(message_id, data)

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        query = self._ref(channel.realtime_path).order_by_key()
        if after_id is not None:
            query = query.start_at(after_id)
        # One extra: start_at is inclusive. The filter below repeats the query's work on the
        # client, so that a server which ignores queries still gives the right answer.
        data = await self._run(query.limit_to_first(limit + 1).get) or {}
        found = []
        for message_id in sorted(data):
            if after_id is not None and message_id <= after_id:
                continue
            message = self._decode(message_id, data[message_id])
            if message is not None:
                found.append(message)
        return found[:limit]

    async def read_before(
        self, channel: ChannelRef, before: tuple[int, str] | None, limit: int
    ) -> list[RealtimeMessage]:
        query = self._ref(channel.realtime_path).order_by_child("timestamp")
        if before is not None:
            query = query.end_at(before[0])
        # end_at is inclusive and orders ties by key: ask for more while the cursor's own
        # millisecond could fill the answer. The filter repeats the query on the client, so a
        # server that ignores queries still gives the right answer.
        want = limit + 1
        while True:
            data = await self._run(query.limit_to_last(want).get) or {}
            found = []
            for message_id, value in data.items():
                message = self._decode(message_id, value)
                if message is None:
                    continue
                if before is None or (message.timestamp, message_id) < before:
                    found.append(message)
            found.sort(key=lambda m: (m.timestamp, m.message_id), reverse=True)
            if len(found) >= limit or len(data) < want:
                return found[:limit]
            want *= 2

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        await self._run(self._ref(channel.realtime_path).child(message_id).delete)
        await self._run(self._marks(channel).child(message_id).delete)

    async def unconfirmed(
        self,
        channel: ChannelRef,
        after: tuple[int, str] | None,
        sent_until_ms: int,
        limit: int,
    ) -> list[RealtimeMessage]:
        query = self._marks(channel).order_by_value().end_at(sent_until_ms)
        if after is not None:
            query = query.start_at(after[0])
        want = limit + 1
        while True:
            marks = await self._run(query.limit_to_first(want).get) or {}
            keys = sorted(
                (int(ts), message_id)
                for message_id, ts in marks.items()
                if isinstance(ts, int)
                and ts <= sent_until_ms
                and (after is None or (ts, message_id) > after)
            )
            if len(keys) >= limit or len(marks) < want:
                break
            want *= 2
        found: list[RealtimeMessage] = []
        gone: dict[str, None] = {}
        for _, message_id in keys[:limit]:
            message = await self.read(channel, message_id)
            if message is None:
                gone[message_id] = None
            else:
                found.append(message)
        if gone:  # expired or deleted: nothing left to save
            await self._run(self._marks(channel).update, gone)
        return found

    async def unconfirmed_channels(self, sent_until_ms: int) -> list[ChannelRef]:
        # The Realtime Database drops empty nodes: every channel under `unconfirmed/` holds
        # marks (perhaps younger ones: a superset is allowed).
        found = []
        workspaces = await self._run(self._ref("unconfirmed").get, False, True) or {}
        for workspace in workspaces:
            channels = await self._run(self._ref(f"unconfirmed/{workspace}").get, False, True)
            found += [ChannelRef(workspace, channel_id) for channel_id in channels or {}]
        return sorted(found)

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._run(self._marks(channel).update, dict.fromkeys(message_ids))

    async def read_after(self, channel: ChannelRef, cursor: str | None, limit: int) -> ReplayPage:
        floor, strict = "", False
        if cursor is not None:
            match = _CURSOR.fullmatch(cursor)
            if match is None:
                raise InvalidInput("cursor", "is not a cursor of this realtime tier")
            kind, message_id = match.groups()
            if timestamp_of(message_id) < self._clock.now_ms() - REALTIME_TTL_MS:
                raise CursorExpired(f"cursor {cursor!r} is older than the realtime tier keeps")
            if kind == "w":  # a client's resume: replay the window before it (module docstring)
                floor = time_prefix(max(0, timestamp_of(message_id) - self._window_ms))
            else:
                floor, strict = message_id, True
        query = self._ref(channel.realtime_path).order_by_key()
        if floor:
            query = query.start_at(floor)
        data = await self._run(query.limit_to_first(limit + 1).get) or {}
        # Filtered here too, so that a server which ignores queries still gives the right answer.
        ids = [i for i in sorted(data) if i > floor or (i == floor and not strict)][:limit]
        entries = []
        for message_id in ids:
            message = self._decode(message_id, data[message_id])
            if message is not None:
                entries.append(LiveEntry(channel, message, f"w.{message_id}"))
        next_cursor = f"a.{ids[-1]}" if ids else (cursor or "a.-")
        return ReplayPage(entries, next_cursor, caught_up=len(ids) < limit)

    async def cursor_at(self, channel: ChannelRef, time_ms: int) -> str:
        return f"a.{time_prefix(max(0, time_ms))}"

    def live_feed(self) -> LiveFeed:
        return _FirebaseFeed(self, asyncio.get_running_loop())

    def changes(self, event: db.Event) -> list[RealtimeMessage]:
        return self._changes(event)

    def _changes(self, event: db.Event) -> list[RealtimeMessage]:
        """The unexpired messages an event carries, in id order."""
        data = event.data
        if not isinstance(data, dict):
            return []
        path = event.path.strip("/")
        if path:  # a put or patch at /{id}
            found = self._decode(path, data)
            return [found] if found else []
        messages = (self._decode(k, v) for k, v in sorted(data.items()))
        return [m for m in messages if m is not None]

    async def channels(self) -> list[ChannelRef]:
        found = []
        workspaces = await self._run(self._ref("messages").get, False, True) or {}
        for workspace in workspaces:
            channels = await self._run(self._ref(f"messages/{workspace}").get, False, True) or {}
            found += [ChannelRef(workspace, channel_id) for channel_id in channels]
        return sorted(found)

    async def sweep_expired(self, now_ms: int) -> int:
        deleted = 0
        for ref in await self.channels():
            deleted += await self._delete_expired(self._ref(ref.realtime_path), now_ms)
            await self._delete_old_marks(self._marks(ref), now_ms - REALTIME_TTL_MS)
        for workspace in await self._run(self._ref("events").get, False, True) or {}:
            await self._delete_expired(self._ref(f"events/{workspace}"), now_ms)
        # Idempotency keys expire like messages: sends/{ws}/{user}/{clientMessageId}.
        for workspace in await self._run(self._ref("sends").get, False, True) or {}:
            for user in await self._run(self._ref(f"sends/{workspace}").get, False, True) or {}:
                await self._delete_expired(self._ref(f"sends/{workspace}/{user}"), now_ms)
        # Rate-limit buckets expire once they would be full again.
        await self._delete_expired(self._ref("limits"), now_ms)
        return deleted

    async def _delete_expired(self, parent: db.Reference, now_ms: int) -> int:
        """Delete the children of ``parent`` whose `ttl` has passed, in one multi-path update."""
        candidates = await self._run(parent.order_by_child("ttl").end_at(now_ms).get) or {}
        # Never trust the query alone: check each child's own ttl.
        expired = {
            key: None
            for key, data in candidates.items()
            if isinstance(data, dict) and int(data.get("ttl", now_ms + 1)) <= now_ms
        }
        if expired:
            await self._run(parent.update, expired)
        return len(expired)

    async def _delete_old_marks(self, parent: db.Reference, sent_before_ms: int) -> None:
        """Marks of messages past their TTL: nothing is left to save."""
        old = await self._run(parent.order_by_value().end_at(sent_before_ms).get) or {}
        stale = {k: None for k, v in old.items() if isinstance(v, int) and v <= sent_before_ms}
        if stale:
            await self._run(parent.update, stale)

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        ref = self._ref(f"sends/{key.workspace_id}/{key.user_id}/{key.client_message_id}")
        now = self._clock.now_ms()
        proposed = {
            "messageId": claim.message_id,
            "timestamp": claim.timestamp,
            "fingerprint": claim.fingerprint,
            "ttl": now + ttl_ms,
        }

        def bind(current: Any) -> Any:
            if isinstance(current, dict) and int(current.get("ttl", 0)) > now:
                return current
            return proposed

        held = await self._run(ref.transaction, bind)
        return SendClaim(str(held["messageId"]), int(held["timestamp"]), str(held["fingerprint"]))

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        # One transaction per bucket (a multi-location transaction would read all of limits/):
        # a refusing bucket stops the round, and the ones before it stay charged.
        for request in requests:
            wait = await self._take_one(request)
            if wait > 0:
                return wait
        return 0.0

    async def _take_one(self, request: TokenRequest) -> float:
        # One flat child per bucket: its key escaped into a single Realtime Database key.
        ref = self._ref(f"limits/{_escape_key(request.key)}")
        cost, rate, burst = request.cost, request.rate_per_s, request.burst
        waits: list[float] = []

        def take(current: Any) -> Any:
            now_ms = self._clock.now_ms()
            tokens, stamp = burst, now_ms
            if isinstance(current, dict):
                tokens = float(current.get("tokens", burst))
                stamp = int(current.get("stamp", now_ms))
            tokens = min(burst, tokens + max(0, now_ms - stamp) / 1000 * rate)
            waits.append(0.0 if tokens >= cost else (cost - tokens) / rate)
            if tokens >= cost:
                tokens -= cost
            full_at = now_ms + int((burst - tokens) / rate * 1000) + 1000
            return {"tokens": tokens, "stamp": now_ms, "ttl": full_at}

        await self._run(ref.transaction, take)
        return waits[-1]  # the attempt that was committed is the last one run

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        record = {**event.to_wire(), "ttl": self._clock.now_ms() + _EVENT_TTL_MS}
        ref = self._ref(f"events/{workspace_id}").child(self._event_ids.new_id())
        await self._run(ref.set, record)

    async def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[db.Event] = asyncio.Queue()

        def deliver(event: db.Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        ref = self._ref(f"events/{workspace_id}")
        registration = await self._run(ref.listen, deliver)
        seen = RecentIds()
        first_snapshot = True
        try:
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), _LIVENESS_CHECK_S)
                except TimeoutError:
                    if not _listening(registration):  # as in `subscribe`
                        _stop(registration)
                        registration = await self._run(ref.listen, deliver)
                    continue
                path = change.path.strip("/")
                data = change.data if isinstance(change.data, dict) else {}
                children = {path: data} if path else data
                for event_id, record in sorted(children.items()):
                    # The stream opens with what is there already: old news.
                    if not isinstance(record, dict) or not seen.first_time(event_id):
                        continue
                    if not first_snapshot or path:
                        yield LiveEvent.from_wire(record)
                if not path:
                    first_snapshot = False
        finally:
            await asyncio.to_thread(_stop, registration)


def _escape_key(key: str) -> str:
    """``key`` as one Realtime Database key: `. $ # [ ] / %` and controls as %XX."""
    return "".join(
        f"%{ord(c):02X}" if c in ".$#[]/%" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in key
    )


@dataclass(eq=False)
class _Watch:
    registration: db.ListenerRegistration | None = None
    snapshot: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    seen: RecentIds = field(default_factory=RecentIds)


class _FirebaseFeed:
    """One `Reference.listen()` per watched channel, funnelled into one queue."""

    def __init__(self, tier: FirebaseRealtimeTier, loop: asyncio.AbstractEventLoop) -> None:
        self._tier = tier
        self._loop = loop
        self._watches: dict[ChannelRef, _Watch] = {}
        self._out: asyncio.Queue[list[LiveEntry]] = asyncio.Queue()
        self._liveness = loop.create_task(self._keep_listening())
        self._stopping: set[asyncio.Task[None]] = set()

    async def watch(self, channel: ChannelRef) -> None:
        if channel in self._watches:
            return
        watch = self._watches[channel] = _Watch()
        try:
            await self._listen(channel, watch)
            # In place once the first snapshot arrived: later writes come as events after it.
            await asyncio.wait_for(asyncio.shield(watch.snapshot), _FIRST_SNAPSHOT_S)
        except BaseException:
            self.unwatch(channel)
            raise

    async def _listen(self, channel: ChannelRef, watch: _Watch) -> None:
        def deliver(event: db.Event) -> None:
            self._loop.call_soon_threadsafe(self._on_event, channel, watch, event)

        ref = self._tier.ref(channel.realtime_path)
        watch.registration = await self._tier.run(ref.listen, deliver)
        if self._watches.get(channel) is not watch:  # unwatched meanwhile
            await asyncio.to_thread(_stop, watch.registration)

    def _on_event(self, channel: ChannelRef, watch: _Watch, event: db.Event) -> None:
        if self._watches.get(channel) is not watch:
            return
        messages = self._tier.changes(event)
        if event.event_type == "put" and event.path == "/":
            # A (re)opened stream starts with the whole channel: news only if never seen.
            first = not watch.snapshot.done()
            fresh = [m for m in messages if watch.seen.first_time(m.message_id)]
            if first:
                watch.snapshot.set_result(None)
                return
            messages = fresh
        else:
            for message in messages:
                watch.seen.first_time(message.message_id)
        if messages:
            self._out.put_nowait([LiveEntry(channel, m, f"w.{m.message_id}") for m in messages])

    async def _keep_listening(self) -> None:
        # firebase-admin's listener thread reconnects by itself, but dies if a reconnect fails
        # (firebase-admin-python#498): then listen anew; its snapshot brings what was missed.
        while True:
            await asyncio.sleep(_LIVENESS_CHECK_S)
            for channel, watch in list(self._watches.items()):
                if watch.registration is not None and not _listening(watch.registration):
                    log.warning("realtime listener died, listening anew: %s", channel)
                    await asyncio.to_thread(_stop, watch.registration)
                    try:
                        await self._listen(channel, watch)
                    except Exception as error:
                        log.warning("listening anew failed, will retry: %r", error)

    def unwatch(self, channel: ChannelRef) -> None:
        watch = self._watches.pop(channel, None)
        if watch is not None and watch.registration is not None:
            task = self._loop.create_task(asyncio.to_thread(_stop, watch.registration))
            self._stopping.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._stopping.discard)

    async def next_entries(self) -> list[LiveEntry]:
        return await next_batches(self._out)

    async def close(self) -> None:
        self._liveness.cancel()
        await asyncio.gather(*self._stopping, return_exceptions=True)
        watches = list(self._watches.values())
        self._watches.clear()
        await asyncio.gather(
            *(asyncio.to_thread(_stop, w.registration) for w in watches if w.registration),
            return_exceptions=True,
        )


def _listening(registration: db.ListenerRegistration) -> bool:
    thread = getattr(registration, "_thread", None)
    return thread is None or bool(thread.is_alive())


def _stop(registration: db.ListenerRegistration) -> None:
    """Stop a listener at once and quietly.

    `ListenerRegistration.close()` closes the response under the reading thread, which then
    waits for the next server event (up to a ~30 s keep-alive) and dies with an AttributeError.
    Telling its SSE client not to reconnect and shutting the socket down ends the stream the way
    a server hang-up would: the thread's loop finishes cleanly, and the join is immediate.
    """
    sse: Any = getattr(registration, "_sse", None)
    with contextlib.suppress(Exception):
        sse.should_connect = False
        sse.retry = 0
        sse.resp.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    thread = getattr(registration, "_thread", None)
    if thread is not None:
        thread.join(timeout=2)  # let it see the hang-up before the response is closed
    with contextlib.suppress(Exception):
        registration.close()


def create(url: str, context: BackendContext) -> RealtimeTier:
    return FirebaseRealtimeTier(
        url,
        context.clock,
        context.realtime_timeout_s,
        context.realtime_threads,
        context.live_replay_window_ms,
    )
