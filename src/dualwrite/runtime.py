"""One place that builds a configured `dualwrite`, and runs its background work.

The server and the CLI both call `open_dualwrite`; it wires the backends named by `Settings`
(with group commit and injected faults where asked) into a `DualWrite`, and runs the retrier,
the TTL sweeper and the reconciler beside it until the block exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from dualwrite import metrics
from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.clock import Clock, SystemClock
from dualwrite.errors import BackendError
from dualwrite.faults import Faults, FaultyPermanentStore, FaultyRealtimeTier
from dualwrite.group_commit import GroupCommitStore
from dualwrite.logs import OutageLog
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.reporting import init_sentry
from dualwrite.retry_queue import RetryQueue
from dualwrite.service import DualWrite
from dualwrite.settings import Settings

log = logging.getLogger(__name__)

REALTIME_FAULTED = ("write",)
"""The realtime call `--fault realtime=P` fails: a send's delivery, once per send."""
PERMANENT_FAULTED = ("save", "save_many")
"""The permanent calls `--fault permanent=P` fail: one per send or retry (group commit is
inside the fault wrapper, so a batch of sends still decides once each)."""


async def _every(interval_s: float, job: Callable[[], Awaitable[None]], outages: OutageLog) -> None:
    """Run ``job`` every ``interval_s`` until cancelled; a failed round is logged, not fatal
    (once, then as reminders while it keeps failing: a backend down is not a new event each
    round). A round that works proves nothing (it may not have needed the store), so it
    does not end the outage: only a quiet spell does (`OutageLog`)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception as error:
            outages.failed(error)


def _start_background(app: DualWrite, settings: Settings) -> list[asyncio.Task[None]]:
    async def sweep_round() -> None:
        deleted = await app.sweep()
        if deleted:
            log.info("swept expired realtime entries: count=%d", deleted)

    async def reconcile_round() -> None:
        report = await app.reconcile()
        if report.persisted:
            log.warning("reconcile: %s", report)
        if report.failed:
            # A store that is down fails every round: the outage log says so once, not each time.
            raise BackendError(f"{report.failed} delivered messages could not be checked or saved")

    def outages(name: str) -> OutageLog:
        return OutageLog(log, f"{name} round", settings.outage_reminder_s)

    return [
        asyncio.create_task(app.retrier.run(settings.retry_poll_s)),
        asyncio.create_task(_every(settings.sweep_interval_s, sweep_round, outages("sweep"))),
        asyncio.create_task(
            _every(settings.reconcile_interval_s, reconcile_round, outages("reconcile"))
        ),
    ]


@contextlib.asynccontextmanager
async def open_dualwrite(
    settings: Settings | None = None,
    *,
    realtime: RealtimeTier | None = None,
    store: PermanentStore | None = None,
    clock: Clock | None = None,
    background: bool = True,
) -> AsyncIterator[DualWrite]:
    """Connect the configured backends (or the ones given) and yield a `DualWrite`.

    With ``background`` the retrier, the TTL sweeper and the reconciler run until the block
    exits. Backends passed in are connected and closed here too.
    """
    settings = settings or Settings.from_env()
    clock = clock or SystemClock()
    init_sentry(settings.sentry_dsn)
    context = BackendContext.from_settings(settings, clock)
    realtime = realtime or create_realtime_tier(settings.realtime_url, context)
    store = store or create_permanent_store(settings.store_url, context)
    if settings.group_commit:
        store = GroupCommitStore(
            store,
            max_batch=settings.group_max_batch,
            max_in_flight=settings.group_max_in_flight,
            max_wait_s=settings.group_max_wait_ms / 1000,
        )
    # `--fault` decides once per send: only the write a send makes to each tier is faulted,
    # not its idempotency claim, reads, history or live subscriptions, so realtime=0.5 fails
    # half the sends (not three in four) and permanent=1.0 still lets the page read.
    if settings.fault_realtime:
        log.warning("injecting realtime faults: probability=%s", settings.fault_realtime)
        realtime = FaultyRealtimeTier(
            realtime, Faults(probability=settings.fault_realtime, operations=REALTIME_FAULTED)
        )
    if settings.fault_permanent:
        log.warning("injecting permanent-store faults: probability=%s", settings.fault_permanent)
        store = FaultyPermanentStore(
            store, Faults(probability=settings.fault_permanent, operations=PERMANENT_FAULTED)
        )
    queue = RetryQueue(settings.queue_path)
    async with contextlib.AsyncExitStack() as stack:
        # Each close is registered before its connect: a connect that fails halfway (a pool
        # opened, a schema missing) still releases what it opened.
        stack.push_async_callback(realtime.close)
        await realtime.connect()
        stack.push_async_callback(store.close)
        await store.connect()
        stack.push_async_callback(queue.close)
        await queue.open()
        app = DualWrite(settings, realtime, store, queue, clock)
        stack.push_async_callback(app.live.close)
        metrics.QUEUE_DEPTH.set(await queue.count())
        tasks = _start_background(app, settings) if background else []
        try:
            yield app
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await app.sender.confirmations.close()
