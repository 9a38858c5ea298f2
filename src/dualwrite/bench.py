"""`dualwrite bench`: how many sends per second the send path acknowledges, and how fast."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from dualwrite.errors import SendFailed
from dualwrite.model import User
from dualwrite.runtime import DualWrite


@dataclass
class BenchReport:
    realtime_url: str
    store_url: str
    messages: int
    concurrency: int
    elapsed_s: float
    latencies_ms: list[float] = field(repr=False)
    outcomes: Counter[str]

    @property
    def sends_per_s(self) -> float:
        acknowledged = self.outcomes["saved"] + self.outcomes["pending"]
        return acknowledged / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "realtime": self.realtime_url,
            "store": self.store_url,
            "messages": self.messages,
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed_s, 3),
            "sends_per_s": round(self.sends_per_s, 1),
            "latency_ms": {
                "p50": round(self.percentile(0.50), 3),
                "p99": round(self.percentile(0.99), 3),
                "p99.9": round(self.percentile(0.999), 3),
                "mean": round(statistics.fmean(self.latencies_ms), 3) if self.latencies_ms else 0,
            },
            "outcomes": dict(self.outcomes),
        }

    def table(self) -> str:
        d = self.as_dict()
        lat = d["latency_ms"]
        rows = [
            ("realtime tier", d["realtime"]),
            ("permanent store", d["store"]),
            ("messages / concurrency", f"{self.messages} / {self.concurrency}"),
            ("elapsed", f"{d['elapsed_s']} s"),
            ("acknowledged sends/s", f"{d['sends_per_s']:,}"),
            ("send latency p50 / p99 / p99.9", f"{lat['p50']} / {lat['p99']} / {lat['p99.9']} ms"),
            ("outcomes", ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class Progress:
    """A one-line progress bar on a terminal; a line every 10% elsewhere."""

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.out: TextIO = out or sys.stderr
        self.done = 0
        self._tty = self.out.isatty()
        self._last_tenth = -1

    def advance(self) -> None:
        self.done += 1
        tenth = self.done * 10 // self.total
        if self._tty and (self.done % 200 == 0 or self.done == self.total):
            bar = "#" * (self.done * 30 // self.total)
            self.out.write(f"\r[{bar:<30}] {self.done}/{self.total}")
            if self.done == self.total:
                self.out.write("\n")
            self.out.flush()
        elif not self._tty and tenth != self._last_tenth:
            self._last_tenth = tenth
            self.out.write(f"bench: {self.done}/{self.total} sent\n")
            self.out.flush()


async def run_bench(
    dw: DualWrite,
    *,
    messages: int,
    concurrency: int,
    channels: int = 8,
    on_sent: Callable[[], None] = lambda: None,
) -> BenchReport:
    """Send ``messages`` with ``concurrency`` senders in flight over ``channels`` channels."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    next_index = 0
    users = [User(f"bench-user-{i}", f"Bench {i}") for i in range(concurrency)]

    async def sender(slot: int) -> None:
        nonlocal next_index
        while next_index < messages:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                result = await dw.send_message(
                    "bench", f"channel-{index % channels}", f"bench message {index}", users[slot]
                )
                outcomes[result.status] += 1
            except SendFailed:
                outcomes["failed"] += 1
            latencies.append((time.perf_counter() - started) * 1000)
            on_sent()

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return BenchReport(
        dw.settings.realtime_url,
        dw.settings.store_url,
        messages,
        concurrency,
        elapsed,
        latencies,
        outcomes,
    )
