"""The retry queue survives the process that filled it being killed with SIGKILL, and
serves several processes sharing its file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dualwrite import Settings, open_dualwrite
from dualwrite.backends import create_permanent_store
from dualwrite.clock import ManualClock
from dualwrite.faults import Faults, FaultyPermanentStore
from dualwrite.model import ChannelRef, PermanentWrite
from dualwrite.ports import PermanentStore
from dualwrite.retrier import Backoff, Retrier
from dualwrite.retry_queue import RetryQueue


def test_a_pending_write_survives_sigkill_and_lands_after_restart(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DUALWRITE_STORE_URL": f"sqlite:///{tmp_path}/messages.db",
        "DUALWRITE_QUEUE_PATH": str(tmp_path / "queue.db"),
    }
    child = textwrap.dedent(
        """
        import asyncio, sys, time
        from dualwrite import Settings, User, open_dualwrite
        from dualwrite.backends import create_permanent_store
        from dualwrite.faults import Faults, FaultyPermanentStore

        async def main():
            settings = Settings.from_env()
            faults = Faults(); faults.fail()
            store = FaultyPermanentStore(create_permanent_store(settings.store_url), faults)
            async with open_dualwrite(settings, store=store) as dw:
                result = await dw.send_message("ws", "general", "survive", User("u1", "Ada"))
                print(result.message_id, result.status, flush=True)
                time.sleep(60)  # killed here, with the event loop blocked

        asyncio.run(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    message_id, status = process.stdout.readline().split()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert status == "pending"

    async def restart() -> None:
        settings = Settings.from_env(env)
        async with open_dualwrite(settings, background=False) as dw:
            [entry] = await dw.pending()
            assert entry.message_id == message_id and entry.write.text == "survive"
            assert (await dw.retry_all()).saved == [message_id]
            history = await dw.history("ws", "general")
            assert [(m.message_id, m.text, m.saved) for m in history.messages] == [
                (message_id, "survive", True)
            ]

    asyncio.run(restart())


# One queue file shared by several processes (`serve --workers N`): each `RetryQueue` below has
# its own SQLite connection, as each worker has.

WS = ChannelRef("ws", "general")


def queued_write(index: int) -> PermanentWrite:
    return PermanentWrite(WS, f"m{index:04d}", "u1", "Ada", f"text {index}", 1_000 + index, True)


@contextlib.asynccontextmanager
async def shared_queue(path: Path, workers: int) -> AsyncIterator[list[RetryQueue]]:
    queues = [RetryQueue(str(path)) for _ in range(workers)]
    for queue in queues:
        await queue.open()
    try:
        yield queues
    finally:
        for queue in queues:
            await queue.close()


async def test_claims_on_a_shared_file_split_the_due_entries(tmp_path: Path) -> None:
    async with shared_queue(tmp_path / "queue.db", 2) as (a, b):
        for index in range(10):
            await a.put(queued_write(index), "down", now_ms=100)
        first = await a.claim(now_ms=200, limit=6, lease_until_ms=5_000)
        second = await b.claim(now_ms=200, limit=6, lease_until_ms=5_000)
        assert len(first) == 6 and len(second) == 4
        assert not {e.message_id for e in first} & {e.message_id for e in second}
        assert await b.claim(now_ms=4_999, limit=10, lease_until_ms=9_000) == []
        # Entries come back as they were, and are due to anyone again when the lease ends.
        assert {e.next_attempt_at for e in first} == {100}
        assert len(await b.claim(now_ms=5_000, limit=10, lease_until_ms=9_000)) == 10


async def test_released_entries_are_due_at_once_unless_someone_changed_them(
    tmp_path: Path,
) -> None:
    async with shared_queue(tmp_path / "queue.db", 2) as (a, b):
        for index in range(3):
            await a.put(queued_write(index), "down", now_ms=100)
        claimed = await a.claim(now_ms=200, limit=3, lease_until_ms=5_000)
        # Meanwhile b saved one (its removal) and rescheduled another.
        await b.remove(WS, "m0000")
        await b.reschedule(claimed[1], next_attempt_at=7_000, error="still down")
        await a.release(claimed, lease_until_ms=5_000)
        assert [(e.message_id, e.next_attempt_at) for e in await b.entries(limit=10)] == [
            ("m0001", 7_000),
            ("m0002", 100),
        ]


async def test_a_late_attempt_on_an_entry_saved_elsewhere_brings_nothing_back(
    tmp_path: Path,
) -> None:
    async with shared_queue(tmp_path / "queue.db", 2) as (a, b):
        await a.put(queued_write(0), "down", now_ms=100)
        [entry] = await a.due(now_ms=200, limit=10)
        await b.remove(WS, "m0000")  # b saved it
        await a.reschedule(entry, next_attempt_at=300, error="a's attempt timed out")
        await a.remove(WS, "m0000")
        assert await b.count() == 0


def retrier(queue: RetryQueue, store: PermanentStore, lease_s: float) -> Retrier:
    async def saved(channel: ChannelRef, message_id: str) -> None:
        pass

    return Retrier(
        queue,
        store,
        ManualClock(10_000),
        timeout_s=5,
        lease_s=lease_s,
        backoff=Backoff(1, 300),
        remind_every_s=300,
        on_saved=saved,
        batch_size=100,
    )


@pytest.mark.parametrize("lease_s", [10.0, 0.0], ids=["leased", "no-lease"])
async def test_two_retriers_on_one_queue_save_each_write_once(
    tmp_path: Path, lease_s: float
) -> None:
    """With leases they share the work; without (a lease run out), an entry may be attempted
    twice, and is still saved once: writes are keyed by message id."""
    calls = Faults()
    store = FaultyPermanentStore(create_permanent_store(f"sqlite:///{tmp_path}/m.db"), calls)
    await store.connect()
    try:
        async with shared_queue(tmp_path / "queue.db", 2) as (a, b):
            for index in range(200):
                await a.put(queued_write(index), "down", now_ms=100)
            reports = [
                *await asyncio.gather(
                    retrier(a, store, lease_s).retry_due(), retrier(b, store, lease_s).retry_due()
                )
            ]
            reports += await asyncio.gather(
                retrier(a, store, lease_s).retry_due(), retrier(b, store, lease_s).retry_due()
            )
            assert await a.count() == 0
            saved = [m for report in reports for m in report.saved]
            assert set(saved) == {f"m{index:04d}" for index in range(200)}
            if lease_s:
                assert len(saved) == calls.calls["save"] == 200, "no entry taken twice"
        [(rows, distinct)] = sqlite_rows(tmp_path / "m.db")
        assert rows == distinct == 200
    finally:
        await store.close()


async def test_a_retrier_that_stops_at_a_failure_gives_the_rest_back(tmp_path: Path) -> None:
    failing, healthy = Faults(), Faults()
    failing.fail()
    path = f"sqlite:///{tmp_path}/m.db"
    down = FaultyPermanentStore(create_permanent_store(path), failing)
    up = FaultyPermanentStore(create_permanent_store(path), healthy)
    await down.connect()
    await up.connect()
    try:
        async with shared_queue(tmp_path / "queue.db", 2) as (a, b):
            for index in range(5):
                await a.put(queued_write(index), "down", now_ms=100)
            report = await retrier(a, down, 10).retry_due()
            assert len(report.failed) == 1 and not report.saved
            # The four it did not attempt are due for the other process at once.
            assert len((await retrier(b, up, 10).retry_due()).saved) == 4
    finally:
        await down.close()
        await up.close()


def sqlite_rows(path: Path) -> list[tuple[int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT count(*), count(DISTINCT message_id) FROM messages").fetchall()
