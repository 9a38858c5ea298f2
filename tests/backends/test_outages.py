"""Real outages of the production pair, no mocks: Redis paused or cut off, PostgreSQL cut off."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from dualwrite import DualWrite, SendFailed, Settings, User, open_dualwrite
from dualwrite.backends import create_permanent_store
from dualwrite.errors import BackendError
from dualwrite.model import ChannelRef
from dualwrite.tools.proxy import TcpProxy
from tests.conftest import realtime_url, store_url, unique
from tests.support.wait import until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
ADA = User("u1", "Ada")


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    return urlunsplit(parts._replace(netloc=netloc))


async def started_proxy(url: str) -> TcpProxy:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return proxy


@pytest.fixture
async def redis_proxy(tmp_path: Path) -> AsyncIterator[TcpProxy]:
    proxy = await started_proxy(realtime_url("redis", tmp_path))
    yield proxy
    await proxy.cut()


@pytest.fixture
async def postgres_proxy(tmp_path: Path) -> AsyncIterator[TcpProxy]:
    proxy = await started_proxy(store_url("postgres", tmp_path))
    yield proxy
    await proxy.cut()


def settings(tmp_path: Path, realtime: str, store: str) -> Settings:
    return Settings(
        realtime_url=realtime,
        store_url=store,
        queue_path=str(tmp_path / "queue.db"),
        realtime_timeout_s=0.5,
        permanent_timeout_s=0.5,
        retry_base_s=0.05,
        retry_cap_s=0.5,
    )


async def queue_empty(dw: DualWrite) -> bool:
    return not await dw.pending()


async def test_paused_redis_fails_the_send_within_the_timeout(tmp_path: Path) -> None:
    rt = realtime_url("redis", tmp_path)
    postgres = store_url("postgres", tmp_path)
    permanent = create_permanent_store(postgres)
    async with open_dualwrite(
        settings(tmp_path, rt, postgres), store=permanent, background=False
    ) as dw:
        admin: Any = aioredis.Redis.from_url(os.environ["DUALWRITE_TEST_REDIS_URL"])
        workspace = unique("ws")
        await admin.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        try:
            started = time.monotonic()
            with pytest.raises(SendFailed):
                await dw.send_message(workspace, "general", "hi", ADA)
            assert time.monotonic() - started < 2.0
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
        # Nothing reached PostgreSQL and nothing was queued. (The realtime write itself may
        # still land once Redis wakes: a timeout cannot take back what Redis already holds;
        # the reconciler persists such late deliveries.)
        page = await permanent.history(ChannelRef(workspace, "general"), None, 10)
        assert page.messages == []
        assert await dw.pending() == []


async def test_redis_cut_off_fails_the_send_and_recovers(
    tmp_path: Path, redis_proxy: TcpProxy
) -> None:
    rt = through(redis_proxy, realtime_url("redis", tmp_path))
    async with open_dualwrite(
        settings(tmp_path, rt, store_url("postgres", tmp_path)), background=False
    ) as dw:
        workspace = unique("ws")
        await redis_proxy.cut()
        with pytest.raises(SendFailed):
            await dw.send_message(workspace, "general", "lost", ADA)
        await redis_proxy.restore()
        result = await dw.send_message(workspace, "general", "back", ADA)
        assert result.status == "saved"
        history = await dw.history(workspace, "general")
        assert [m.text for m in history.messages] == ["back"]


async def test_postgres_cut_off_gives_pending_and_the_write_lands_once_back(
    tmp_path: Path, postgres_proxy: TcpProxy
) -> None:
    postgres = through(postgres_proxy, store_url("postgres", tmp_path))
    permanent = create_permanent_store(postgres)
    async with open_dualwrite(
        settings(tmp_path, realtime_url("redis", tmp_path), postgres),
        store=permanent,
        background=False,
    ) as dw:
        workspace = unique("ws")
        await postgres_proxy.cut()
        result = await dw.send_message(workspace, "general", "later", ADA)
        assert result.status == "pending"
        assert [e.message_id for e in await dw.pending()] == [result.message_id]
        assert (await dw.retry_all()).failed == [result.message_id]

        await postgres_proxy.restore()
        # The background retrier finds PostgreSQL back on its own.
        retrier = asyncio.create_task(dw.retrier.run(poll_interval_s=0.05))
        try:
            await until(lambda: queue_empty(dw), 30)
        finally:
            retrier.cancel()
        stored = await permanent.get(ChannelRef(workspace, "general"), result.message_id)
        assert stored is not None and stored.timestamp == result.timestamp


async def test_a_black_holed_postgres_bounds_every_call(
    tmp_path: Path, postgres_proxy: TcpProxy
) -> None:
    """PostgreSQL keeps the connections open and answers nothing: each call gives up within
    its bound with a clear error (503 over HTTP), and the reconciler's round still ends."""
    postgres = through(postgres_proxy, store_url("postgres", tmp_path))
    async with open_dualwrite(
        settings(tmp_path, realtime_url("redis", tmp_path), postgres), background=False
    ) as dw:
        workspace = unique("ws")
        saved = await dw.send_message(workspace, "general", "before", ADA)
        assert saved.status == "saved"
        postgres_proxy.black_hole()
        try:
            pending = await dw.send_message(workspace, "general", "during", ADA)
            assert pending.status == "pending"
            assert await dw.retry(pending.message_id, workspace, "general") == "pending"
            for call in (
                dw.retry(saved.message_id, workspace, "general"),
                dw.inspect(saved.message_id, workspace, "general"),
                dw.history(workspace, "general"),
            ):
                with pytest.raises(BackendError):
                    await call
            # A message some process delivered and never saved, past the grace period.
            dw.reconciler.grace_ms = 0
            report = await dw.reconcile()
            assert report.failed >= 1 and report.persisted == 0
        finally:
            postgres_proxy.flow()
        assert (await dw.retry(pending.message_id, workspace, "general")) == "saved"
