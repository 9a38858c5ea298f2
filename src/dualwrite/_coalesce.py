"""Coalescing of concurrent calls into batches: the engine of group commit.

Callers each submit one item and await their own outcome. While a batch is in flight, new items
queue up; the next batch takes all that queued (up to ``max_batch``). At low load a call goes
out alone at once; under load one round trip carries many. If a whole batch fails, its items
are retried one by one, so each caller learns its own outcome: with ``commit_retry`` where a
failed batch may still have committed some of them (a pipeline is not a transaction), so that a
retry can tell a committed item from a new one.

A caller that gives up (its timeout cancels it) leaves its item behind: an item not yet sent is
dropped, and a batch whose callers have all given up is cancelled, so that a send reported as
failed does not land later, when the backend wakes up.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Batch:
    futures: list[asyncio.Future[None]]
    task: asyncio.Task[None]


class Coalescer(Generic[T]):
    def __init__(
        self,
        commit_many: Callable[[Sequence[T]], Awaitable[None]],
        commit_one: Callable[[T], Awaitable[None]],
        *,
        max_batch: int,
        max_in_flight: int,
        max_wait_s: float = 0.0,
        commit_retry: Callable[[T], Awaitable[None]] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_in_flight must be >= 1, max_wait_s >= 0")
        self._commit_many = commit_many
        self._commit_one = commit_one
        self._commit_retry = commit_retry or commit_one
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self._batch_of: dict[asyncio.Future[None], _Batch] = {}

    async def submit(self, item: T) -> None:
        """Commit ``item`` (in some batch); raises what committing it raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        try:
            await future
        except asyncio.CancelledError:
            batch = self._batch_of.get(future)
            if batch is not None and all(f.done() for f in batch.futures):
                batch.task.cancel()
            raise

    async def _drain(self) -> None:
        while self._queue:
            await self._slots.acquire()
            if self._max_wait_s and len(self._queue) < self._max_batch:
                await asyncio.sleep(self._max_wait_s)
            batch: list[tuple[T, asyncio.Future[None]]] = []
            while self._queue and len(batch) < self._max_batch:
                item, future = self._queue.popleft()
                if not future.done():  # its caller gave up before it was sent
                    batch.append((item, future))
            if not batch:
                self._slots.release()
                continue
            futures = [future for _, future in batch]
            record = _Batch(futures, asyncio.create_task(self._commit(batch)))
            for future in futures:
                self._batch_of[future] = record
            record.task.add_done_callback(functools.partial(self._forget, futures))

    def _forget(self, futures: list[asyncio.Future[None]], _task: object) -> None:
        for future in futures:
            self._batch_of.pop(future, None)

    async def _commit(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            items = [item for item, _ in batch]
            outcomes: list[BaseException | None]
            try:
                if len(items) == 1:
                    await self._commit_one(items[0])
                else:
                    await self._commit_many(items)
                outcomes = [None] * len(items)
            except Exception as error:
                if len(items) == 1:
                    outcomes = [error]
                else:
                    results = await asyncio.gather(
                        *(self._commit_retry(item) for item in items), return_exceptions=True
                    )
                    outcomes = [r if isinstance(r, BaseException) else None for r in results]
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the caller gave up (timeout): nothing to tell
                    continue
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(outcome)
        finally:
            self._slots.release()
