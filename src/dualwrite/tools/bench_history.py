"""`dualwrite bench --target history` and `--target reconcile`: what reading costs as a channel
grows.

Both fill one fresh channel with N messages in both tiers (saved, confirmed, spread over the
last 50 minutes so that none expires), written in bulk rather than sent one by one so that
1,000,000 messages fill in minutes. Then:

- history: the first page and pages deep in the channel (cursors at 10 %, 50 % and 90 % of its
  depth), p50/p99, through the library and over HTTP from a `serve` process;
- reconcile: a reconcile round's time (the median of 3, each finding 100 new delivered but
  unsaved messages past the grace period among the N) and the store calls one round made.

Each is reported beside the same at a small N (1,000 for history, 10,000 for reconcile), with
the load average, since a shared machine's figures depend on its neighbours.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.clock import SystemClock
from dualwrite.faults import Faults, FaultyPermanentStore, FaultyRealtimeTier
from dualwrite.ids import time_prefix
from dualwrite.model import (
    REALTIME_TTL_MS,
    ChannelRef,
    PermanentWrite,
    RealtimeMessage,
    history_cursor,
)
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.runtime import open_dualwrite
from dualwrite.settings import Settings
from dualwrite.tools.bench import WORKSPACE, bench_server, percentile

_SPREAD_MS = 50 * 60_000
_FILL_BATCH = 1_000
_PAGE = 50
_ORPHANS = 100
_ROUNDS = 3
_SETTLE_S = 2.0


@dataclass
class Filled:
    """A channel of ``count`` messages; ``keys`` are their (timestamp, id), oldest first."""

    channel: ChannelRef
    keys: list[tuple[int, str]] = field(repr=False)

    def cursor_at(self, depth: float) -> str:
        """The cursor that continues below the message ``depth`` (0..1) of the way down."""
        timestamp, message_id = self.keys[int((1 - depth) * (len(self.keys) - 1))]
        return history_cursor(timestamp, message_id)


def _message(index: int, timestamp: int) -> RealtimeMessage:
    message_id = time_prefix(timestamp) + secrets.token_urlsafe(9)[:12]
    return RealtimeMessage(
        message_id,
        "bench-user",
        "Bench",
        f"history {index}",
        timestamp,
        timestamp + REALTIME_TTL_MS,
    )


async def fill(
    realtime: RealtimeTier,
    store: PermanentStore,
    count: int,
    now_ms: int,
    on_progress: Callable[[int], None] = lambda done: None,
    channels: int = 1,
) -> Filled:
    """Write ``count`` saved messages in both tiers, in bulk: to one fresh channel, or spread
    round-robin over ``channels`` fresh ones (the first is the one returned)."""
    name = f"history-{count}-{secrets.token_hex(4)}"
    targets = [ChannelRef(WORKSPACE, f"{name}-{k}" if k else name) for k in range(channels)]
    start = now_ms - _SPREAD_MS
    keys: list[tuple[int, str]] = []
    for first in range(0, count, _FILL_BATCH):
        batch = [
            (targets[i % channels], _message(i, start + i * _SPREAD_MS // count))
            for i in range(first, min(count, first + _FILL_BATCH))
        ]
        await asyncio.gather(*(realtime.write(c, m) for c, m in batch))
        await store.save_many([PermanentWrite.from_realtime(c, m) for c, m in batch])
        by_channel: dict[ChannelRef, list[str]] = {}
        for c, m in batch:
            by_channel.setdefault(c, []).append(m.message_id)
        await asyncio.gather(*(realtime.confirm(c, i) for c, i in by_channel.items()))
        keys += [(m.timestamp, m.message_id) for c, m in batch if c == targets[0]]
        on_progress(first + len(batch))
    return Filled(targets[0], keys)


def _figures(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50": round(percentile(ms, 0.5), 2), "p99": round(percentile(ms, 0.99), 2)}


async def _time_pages(
    read: Callable[[str | None], Any], filled: Filled, pages: int
) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of the first page and of pages deep in the channel."""
    for _ in range(min(20, pages)):  # warm connections and caches
        await read(None)
    results: dict[str, dict[str, float]] = {}
    for label, depth in (("first", None), ("deep", 0.1), ("deeper", 0.5), ("deepest", 0.9)):
        cursor = None if depth is None else filled.cursor_at(depth)
        took = []
        for _ in range(pages):
            started = time.perf_counter()
            await read(cursor)
            took.append(time.perf_counter() - started)
        results[label] = _figures(took)
    return results


def _backends(settings: Settings) -> tuple[RealtimeTier, PermanentStore]:
    context = BackendContext.from_settings(settings)
    return (
        create_realtime_tier(settings.realtime_url, context),
        create_permanent_store(settings.store_url, context),
    )


async def run_history(
    settings: Settings, scratch: str, sizes: Sequence[int], pages: int, http: bool
) -> dict[str, Any]:
    """History page times at each size in ``sizes``."""
    import aiohttp

    realtime, store = _backends(settings)
    report: dict[str, Any] = {"load_average": os.getloadavg(), "page": _PAGE, "sizes": {}}
    async with open_dualwrite(settings, realtime=realtime, store=store, background=False) as dw:
        filled = []
        for size in sizes:
            started = time.perf_counter()
            filled.append(
                await fill(realtime, store, size, SystemClock().now_ms(), _progress(size))
            )
            print(f"\nfilled {size:,} in {time.perf_counter() - started:.1f} s", flush=True)
        for size, channel in zip(sizes, filled, strict=True):

            async def library(cursor: str | None, channel: Filled = channel) -> None:
                ref = channel.channel
                await dw.history(ref.workspace_id, ref.channel_id, cursor, _PAGE)

            report["sizes"][size] = {"library": await _time_pages(library, channel, pages)}
    if http:
        with bench_server(settings, scratch) as server:
            headers = {"authorization": f"Bearer {server.token}"}
            async with aiohttp.ClientSession(server.base_url, headers=headers) as session:
                for size, channel in zip(sizes, filled, strict=True):

                    async def over_http(cursor: str | None, channel: Filled = channel) -> None:
                        params = {"limit": str(_PAGE), **({"before": cursor} if cursor else {})}
                        path = f"/api/workspaces/{WORKSPACE}/channels/{channel.channel.channel_id}"
                        async with session.get(f"{path}/messages", params=params) as response:
                            response.raise_for_status()
                            await response.read()

                    report["sizes"][size]["http"] = await _time_pages(over_http, channel, pages)
    report["load_average_after"] = os.getloadavg()
    return report


async def run_reconcile(
    settings: Settings, sizes: Sequence[int], spread: bool = False
) -> dict[str, Any]:
    """One reconcile round at each size, with ``_ORPHANS`` unsaved messages past the grace:
    the saved messages in one channel, and with ``spread`` also one to a channel (as many
    active channels)."""
    report: dict[str, Any] = {"load_average": os.getloadavg(), "orphans": _ORPHANS, "sizes": {}}
    layouts = [(size, 1) for size in sizes] + [(size, size) for size in sizes if spread]
    for size, channels in layouts:
        inner_realtime, inner_store = _backends(settings)
        realtime_calls, store_calls = Faults(), Faults()
        realtime = FaultyRealtimeTier(inner_realtime, realtime_calls)  # counts, never fails
        store = FaultyPermanentStore(inner_store, store_calls)
        async with open_dualwrite(settings, realtime=realtime, store=store, background=False) as dw:
            now = SystemClock().now_ms()
            filled = await fill(
                inner_realtime, inner_store, size, now, _progress(size), channels=channels
            )
            rounds = []
            for rep in range(_ROUNDS):
                for i in range(_ORPHANS):  # delivered by a process that died before saving
                    sent = now - 2 * 60_000 - _ORPHANS * (rep + 1) + i
                    await inner_realtime.write(filled.channel, _message(size + i, sent))
                # Measure the round, not the fill's aftermath (a full GC pass over its objects,
                # the database writing out what it was just given).
                gc.collect()
                await asyncio.sleep(_SETTLE_S)
                realtime_calls.calls.clear()
                store_calls.calls.clear()
                started = time.perf_counter()
                round_report = await dw.reconcile()
                rounds.append(time.perf_counter() - started)
        label = f"{size:,} in {channels:,}"
        report["sizes"][label] = {
            "round_ms": round(statistics.median(rounds) * 1000, 2),
            "rounds_ms": [round(r * 1000, 2) for r in rounds],
            "scanned": round_report.scanned,
            "persisted": round_report.persisted,
            "failed": round_report.failed,
            "store_calls": dict(store_calls.calls),
            "realtime_calls": dict(realtime_calls.calls),
        }
        print(f"\n{label}: {report['sizes'][label]}", flush=True)
    report["load_average_after"] = os.getloadavg()
    return report


def _progress(total: int) -> Callable[[int], None]:
    def show(done: int) -> None:
        print(f"\rfilling {done:,}/{total:,}", end="", flush=True)

    return show


def history_table(report: dict[str, Any]) -> str:
    """One row per size and path: first and deep pages, p50 / p99 ms."""
    lines = [
        f"history pages of {report['page']} (p50 / p99 ms); load average before "
        f"{_load(report['load_average'])}, after {_load(report['load_average_after'])}",
        f"{'messages':>10}  {'path':<8} {'first':>14} {'10% deep':>14} {'50% deep':>14} "
        f"{'90% deep':>14}",
    ]
    for size, paths in report["sizes"].items():
        for path, figures in paths.items():
            cells = [
                f"{figures[k]['p50']} / {figures[k]['p99']}"
                for k in ("first", "deep", "deeper", "deepest")
            ]
            lines.append(f"{size:>10,}  {path:<8} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def reconcile_table(report: dict[str, Any]) -> str:
    lines = [
        f"a reconcile round (median of {_ROUNDS}), {report['orphans']} unsaved among the "
        "messages; load average "
        f"before {_load(report['load_average'])}, after {_load(report['load_average_after'])}",
        f"{'messages in channels':>22} {'round ms':>10} {'scanned':>8} {'saved':>6} "
        f"{'realtime calls':>14} store calls",
    ]
    for layout, figures in report["sizes"].items():
        calls = ", ".join(f"{k}={v}" for k, v in sorted(figures["store_calls"].items()))
        realtime_calls = sum(figures["realtime_calls"].values())
        lines.append(
            f"{layout:>22} {figures['round_ms']:>10} {figures['scanned']:>8} "
            f"{figures['persisted']:>6} {realtime_calls:>14} {calls}"
        )
    return "\n".join(lines)


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)
