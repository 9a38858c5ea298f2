"""`dualwrite bench`: acknowledged sends per second, send and delivery latency, and the same
backend work done with bare clients (`--baseline raw`) for a ratio to steer by."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dualwrite.errors import SendFailed
from dualwrite.model import User
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings

WORKSPACE = "bench"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 3),
        "p99": round(percentile(values, 0.99), 3),
        "p99.9": round(percentile(values, 0.999), 3),
        "count": len(values),
    }


@dataclass
class BenchReport:
    target: str
    realtime_url: str
    store_url: str
    messages: int
    concurrency: int
    subscribers: int
    elapsed_s: float
    send_ms: list[float] = field(repr=False)
    delivery_ms: list[float] = field(repr=False)
    outcomes: Counter[str]
    cpu_s: float
    peak_rss_mb: float
    baseline: BenchReport | None = None

    @property
    def sends_per_s(self) -> float:
        acknowledged = self.outcomes["saved"] + self.outcomes["pending"]
        return acknowledged / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "target": self.target,
            "realtime": self.realtime_url,
            "store": self.store_url,
            "messages": self.messages,
            "concurrency": self.concurrency,
            "subscribers": self.subscribers,
            "elapsed_s": round(self.elapsed_s, 3),
            "sends_per_s": round(self.sends_per_s, 1),
            "send_latency_ms": _latency(self.send_ms),
            "delivery_latency_ms": _latency(self.delivery_ms),
            "outcomes": dict(self.outcomes),
            "cpu_s": round(self.cpu_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.baseline is not None:
            figures["baseline_raw"] = self.baseline.as_dict()
            if self.baseline.sends_per_s:
                figures["ratio_to_raw"] = round(self.sends_per_s / self.baseline.sends_per_s, 2)
        return figures

    def table(self) -> str:
        d = self.as_dict()
        columns = [("dualwrite", d)]
        if "baseline_raw" in d:
            columns.append(("raw baseline", d["baseline_raw"]))

        def lat(figures: dict[str, Any], key: str) -> str:
            f = figures[key]
            return f"{f['p50']} / {f['p99']} / {f['p99.9']} ms" if f["count"] else "-"

        rows: list[tuple[str, list[str]]] = [
            ("", [name for name, _ in columns]),
            ("target", [f["target"] for _, f in columns]),
            ("realtime tier", [f["realtime"] for _, f in columns]),
            ("permanent store", [f["store"] for _, f in columns]),
            (
                "messages / concurrency",
                [f"{f['messages']} / {f['concurrency']}" for _, f in columns],
            ),
            ("subscribers", [str(f["subscribers"]) for _, f in columns]),
            ("acknowledged sends/s", [f"{f['sends_per_s']:,}" for _, f in columns]),
            ("send latency p50/p99/p99.9", [lat(f, "send_latency_ms") for _, f in columns]),
            ("delivery p50/p99/p99.9", [lat(f, "delivery_latency_ms") for _, f in columns]),
            (
                "outcomes",
                [
                    ", ".join(f"{k}={v}" for k, v in sorted(f["outcomes"].items()))
                    for _, f in columns
                ],
            ),
            (
                "CPU seconds / peak RSS",
                [f"{f['cpu_s']} s / {f['peak_rss_mb']} MB" for _, f in columns],
            ),
        ]
        if "ratio_to_raw" in d:
            rows.append(("dualwrite / raw (sends/s)", [str(d["ratio_to_raw"])]))
        return _align(rows)


def _align(rows: list[tuple[str, list[str]]]) -> str:
    """Rows of a label and values, each column as wide as its widest cell."""
    label_width = max(len(label) for label, _ in rows)
    widths = [
        max(len(values[i]) for _, values in rows if len(values) > i)
        for i in range(max(len(values) for _, values in rows))
    ]
    lines = []
    for label, values in rows:
        cells = [value.ljust(width) for value, width in zip(values, widths, strict=False)]
        lines.append(f"{label.ljust(label_width)}  " + "  |  ".join(cells).rstrip())
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on a terminal; a line every 10% elsewhere."""

    def __init__(self, total: int, out: TextIO | None = None, label: str = "sent") -> None:
        self.total = max(total, 1)
        self.out: TextIO = out or sys.stderr
        self.label = label
        self.done = 0
        self._tty = self.out.isatty()
        self._last_tenth = -1

    def advance(self) -> None:
        self.done += 1
        tenth = self.done * 10 // self.total
        if self._tty and (self.done % 200 == 0 or self.done == self.total):
            bar = "#" * (self.done * 30 // self.total)
            self.out.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.label}")
            if self.done == self.total:
                self.out.write("\n")
            self.out.flush()
        elif not self._tty and tenth != self._last_tenth:
            self._last_tenth = tenth
            self.out.write(f"bench: {self.done}/{self.total} {self.label}\n")
            self.out.flush()


def own_usage() -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def process_usage(pid: int) -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of another process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    cpu = ticks / os.sysconf("SC_CLK_TCK")
    peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cpu, peak


SendOne = Callable[[int, int], Awaitable[str]]
"""(message index, sender slot) -> outcome: "saved", "pending" or "failed"."""


async def drive(
    send_one: SendOne, messages: int, concurrency: int, on_sent: Callable[[], None]
) -> tuple[float, list[float], Counter[str], dict[int, float]]:
    """Run ``messages`` sends with ``concurrency`` in flight; returns elapsed, latencies (ms),
    outcomes and each message's start time (perf_counter), for delivery latency."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    started_at: dict[int, float] = {}
    next_index = 0

    async def sender(slot: int) -> None:
        nonlocal next_index
        while next_index < messages:
            index = next_index
            next_index += 1
            started = started_at[index] = time.perf_counter()
            outcomes[await send_one(index, slot)] += 1
            latencies.append((time.perf_counter() - started) * 1000)
            on_sent()

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(concurrency)))
    return time.perf_counter() - started, latencies, outcomes, started_at


def text_of(index: int) -> str:
    return f"bench message {index}"


def index_of(text: str) -> int | None:
    prefix = "bench message "
    return int(text[len(prefix) :]) if text.startswith(prefix) else None


async def run_library(
    dw: DualWrite,
    *,
    messages: int,
    concurrency: int,
    channels: int = 8,
    on_sent: Callable[[], None] = lambda: None,
) -> BenchReport:
    """The in-process send path, with one live subscriber per channel."""
    users = [User(f"bench-user-{i}", f"Bench {i}") for i in range(concurrency)]
    arrived: dict[int, float] = {}

    async def listen(channel: str, ready: asyncio.Event) -> None:
        stream = dw.subscribe(WORKSPACE, channel)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        ready.set()
        entry = await first
        while True:
            index = index_of(entry.message.text)
            if index is not None:
                arrived[index] = time.perf_counter()
            entry = await anext(stream)

    readies = [asyncio.Event() for _ in range(channels)]
    listeners = [asyncio.create_task(listen(f"channel-{i}", readies[i])) for i in range(channels)]
    await asyncio.gather(*(r.wait() for r in readies))

    async def send_one(index: int, slot: int) -> str:
        try:
            result = await dw.send_message(
                WORKSPACE, f"channel-{index % channels}", text_of(index), users[slot]
            )
        except SendFailed:
            return "failed"
        return result.status

    cpu_before, _ = own_usage()
    elapsed, latencies, outcomes, started_at = await drive(send_one, messages, concurrency, on_sent)
    await asyncio.sleep(0.2)  # the last deliveries
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    cpu_after, peak = own_usage()
    return BenchReport(
        "library",
        dw.settings.realtime_url,
        dw.settings.store_url,
        messages,
        concurrency,
        channels,
        elapsed,
        latencies,
        [(arrived[i] - started_at[i]) * 1000 for i in arrived if i in started_at],
        outcomes,
        cpu_after - cpu_before,
        peak,
    )


async def run_http(
    base_url: str,
    token: str,
    *,
    messages: int,
    concurrency: int,
    subscribers: int,
    channels: int,
    server_pid: int | None,
    labels: tuple[str, str],
    on_sent: Callable[[], None] = lambda: None,
) -> BenchReport:
    """N senders over HTTP and M WebSocket subscribers spread over the channels.

    The load comes from aiohttp: httpx's async client tops out near 200 requests/s here, which
    would measure the client, not the server.
    """
    import aiohttp

    headers = {"authorization": f"Bearer {token}"}
    arrivals: list[tuple[int, float]] = []
    statuses = {201: "saved", 202: "pending"}
    connector = aiohttp.TCPConnector(limit=concurrency + subscribers)
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector) as session:

        async def subscribe(channel: str, ready: asyncio.Event) -> None:
            path = f"/ws/workspaces/{WORKSPACE}/channels/{channel}?token={token}"
            async with session.ws_connect(path) as socket:
                ready.set()
                async for frame in socket:
                    data = json.loads(frame.data)
                    if data.get("type") != "message":
                        continue  # notices (saved, channels) are not deliveries
                    index = index_of(data["text"])
                    if index is not None:
                        arrivals.append((index, time.perf_counter()))

        readies = [asyncio.Event() for _ in range(subscribers)]
        listeners = [
            asyncio.create_task(subscribe(f"channel-{i % channels}", readies[i]))
            for i in range(subscribers)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
        await asyncio.sleep(0.2)

        async def send_one(index: int, slot: int) -> str:
            async with session.post(
                f"/api/workspaces/{WORKSPACE}/channels/channel-{index % channels}/messages",
                json={"text": text_of(index)},
            ) as response:
                await response.read()
                return statuses.get(response.status, "failed")

        before = process_usage(server_pid) if server_pid else (0.0, 0.0)
        elapsed, latencies, outcomes, started_at = await drive(
            send_one, messages, concurrency, on_sent
        )
        await asyncio.sleep(0.5)
        after = process_usage(server_pid) if server_pid else (0.0, 0.0)
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
    return BenchReport(
        "http",
        labels[0],
        labels[1],
        messages,
        concurrency,
        subscribers,
        elapsed,
        latencies,
        [(t - started_at[i]) * 1000 for i, t in arrivals if i in started_at],
        outcomes,
        after[0] - before[0],
        after[1],
    )


async def run_raw(
    realtime_url: str,
    store_url: str,
    *,
    messages: int,
    concurrency: int,
    on_sent: Callable[[], None] = lambda: None,
) -> BenchReport | None:
    """The raw baseline at the same concurrency, or None where these backends have none."""
    from dualwrite.tools.bench_raw import raw_realtime, raw_record, raw_store

    async with raw_realtime(realtime_url) as write, raw_store(store_url) as insert:
        if write is None or insert is None:
            return None
        realtime_write, permanent_insert = write, insert

        async def send_one(index: int, slot: int) -> str:
            record = raw_record(index)
            await realtime_write(index, record)
            await permanent_insert(index, record)
            return "saved"

        cpu_before, _ = own_usage()
        elapsed, latencies, outcomes, _ = await drive(send_one, messages, concurrency, on_sent)
        cpu_after, peak = own_usage()
    return BenchReport(
        "raw",
        realtime_url,
        store_url,
        messages,
        concurrency,
        0,
        elapsed,
        latencies,
        [],
        outcomes,
        cpu_after - cpu_before,
        peak,
    )


def write_json(path: str, report: BenchReport) -> None:
    Path(path).write_text(json.dumps(report.as_dict(), indent=2) + "\n")


@contextlib.contextmanager
def bench_server(settings: Settings, scratch: str) -> Iterator[tuple[str, str, int]]:
    """A `dualwrite serve` process on these backends, for the http target."""
    from dualwrite.server.auth import Identity, TokenSigner
    from dualwrite.tools.serve_process import serve_process

    secret = secrets.token_urlsafe(48)
    env = {
        **os.environ,
        "DUALWRITE_TOKEN_SECRET": secret,
        "DUALWRITE_REALTIME_URL": settings.realtime_url,
        "DUALWRITE_STORE_URL": settings.store_url,
        "DUALWRITE_QUEUE_PATH": str(Path(scratch, "server-queue.db")),
        # One bench user sends everything and holds every socket: its limits are off.
        "DUALWRITE_SEND_RATE_PER_S": "0",
        "DUALWRITE_SEND_BYTES_PER_S": "0",
        "DUALWRITE_CHANNEL_BYTES_PER_S": "0",
        "DUALWRITE_READ_RATE_PER_S": "0",
        "DUALWRITE_WS_MAX_PER_USER": "100000",
    }
    with serve_process(env, Path(scratch, "server.log")) as (base, pid):
        token = TokenSigner(secret, ServerSettings()).mint(
            Identity(User("bench-user", "Bench"), "bench")
        )
        yield base, token, pid
