"""`dualwrite bench`: acknowledged sends per second, send and delivery latency, the same backend
work done with bare clients (`--baseline raw`, `--baseline raw-batched`) for a ratio to steer
by, and for the http target what each held WebSocket connection costs the server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dualwrite.errors import SendFailed
from dualwrite.model import User
from dualwrite.server.collector import short_full_collections
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings

if TYPE_CHECKING:
    import aiohttp

WORKSPACE = "bench"

LOAD_WARNING = 0.5
"""A 1-minute load average above this, and `bench` warns that its figures are noisy."""

BROWSER_HEADERS = {
    "User-Agent": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36"
    ),
    "Accept-Language": "en-US,en;q=0.9",
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
}
"""What a browser's WebSocket handshake carries besides the protocol's own headers: the
server keeps each socket's headers for its lifetime, so they count in its memory."""

OFFER_DEFLATE = True
"""The http target's sockets offer permessage-deflate, as browsers do."""

CONNECTS_IN_FLIGHT = 64
"""Sockets the http target opens at once (well under the server's per-address cap)."""


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
        "max": round(max(values, default=0.0), 3),
        "count": len(values),
    }


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not on this system
        return (0.0, 0.0, 0.0)


async def wait_for_quiet(max_s: float, out: TextIO) -> None:
    """Wait up to ``max_s`` for the 1-minute load average to fall to `LOAD_WARNING`."""
    load = load_average()[0]
    if max_s <= 0 or load <= LOAD_WARNING:
        return
    print(
        f"bench: waiting up to {max_s:.0f} s for the load average ({load:.2f}) "
        f"to fall to {LOAD_WARNING}",
        file=out,
        flush=True,
    )
    deadline = time.monotonic() + max_s
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(5.0, left))  # the kernel updates the average every 5 s
        if load_average()[0] <= LOAD_WARNING:
            return


def announce_load(out: TextIO, err: TextIO, label: str = "") -> tuple[float, float, float]:
    """Print the load average (and warn on stderr when the machine is busy); return it."""
    load = load_average()
    cores = os.cpu_count() or 1
    print(
        f"bench: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min; "
        f"{cores} cores){label}",
        file=out,
        flush=True,
    )
    if load[0] > LOAD_WARNING:
        print(
            f"bench: warning: 1-minute load average {load[0]:.2f} is above {LOAD_WARNING}: "
            "other work shares the machine, these figures are noisy",
            file=err,
            flush=True,
        )
    return load


@dataclass
class Connections:
    """What the server paid for the http target's sockets (RSS in MB, from /proc)."""

    held: int
    """Sockets the bench opened and held."""
    live: int
    """Of those, how many delivered the probe sent to their channel before the measurement."""
    connect_s: float
    rss_before_mb: float
    """The server's RSS after a few sends, before any socket."""
    rss_idle_mb: float
    """With every socket open and idle (after the server's CPU settled)."""
    deliveries_expected: int
    client_lag_ms: list[float] = field(repr=False)
    """How late the bench's own event loop ran a 10 ms timer during the sends: a client that
    cannot keep up shows here, not as the server's delivery latency."""
    client_cpu_s: float
    client_processes: int = 1
    server_thaws: int | None = None
    """Full collections of the server's thawed heap (`dualwrite.server.collector`) during the
    sends: each holds the server's loop for 0.1-1 s at 10,000 sockets, so one in the window
    shows in p99. None: unknown (no `/metrics` to read, or it did not answer)."""
    server_thaw_s: float = 0.0
    steal_s: float = 0.0
    """CPU time the hypervisor gave other guests while this machine's cores wanted it, during
    the sends (`/proc/stat`): a run that paid some measured a slower machine."""

    def as_dict(self) -> dict[str, Any]:
        per_connection = (
            (self.rss_idle_mb - self.rss_before_mb) * 1024 / self.held if self.held else 0.0
        )
        return {
            "held": self.held,
            "live": self.live,
            "connect_s": round(self.connect_s, 2),
            "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_idle_mb": round(self.rss_idle_mb, 1),
            "rss_per_connection_kb": round(per_connection, 2),
            "deliveries_expected": self.deliveries_expected,
            "client_lag_ms": _latency(self.client_lag_ms),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "client_processes": self.client_processes,
            "server_thaws": self.server_thaws,
            "server_thaw_s": round(self.server_thaw_s, 3),
            "steal_s": round(self.steal_s, 2),
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
    rate: float | None = None
    """The send rate asked for (`--rate`), or None: as fast as the concurrency allows."""
    channels: int | None = None
    connections: Connections | None = None
    load: tuple[float, float, float] | None = None

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
            "channels": self.channels,
            "rate": self.rate,
            "elapsed_s": round(self.elapsed_s, 3),
            "sends_per_s": round(self.sends_per_s, 1),
            "send_latency_ms": _latency(self.send_ms),
            "delivery_latency_ms": _latency(self.delivery_ms),
            "outcomes": dict(self.outcomes),
            "cpu_s": round(self.cpu_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.load is not None:
            figures["load_average"] = [round(x, 2) for x in self.load]
        if self.connections is not None:
            figures["connections"] = self.connections.as_dict()
        if self.baseline is not None:
            name = self.baseline.target.replace("-", "_")
            figures[f"baseline_{name}"] = self.baseline.as_dict()
            if self.baseline.sends_per_s:
                figures[f"ratio_to_{name}"] = round(self.sends_per_s / self.baseline.sends_per_s, 2)
        return figures

    def table(self) -> str:
        return figures_table(self.as_dict())


BASELINES = ("raw", "raw-batched")


def _baseline_of(figures: dict[str, Any]) -> tuple[str, dict[str, Any], Any] | None:
    """(name, figures, ratio) of the baseline in ``figures``, if there is one."""
    for name in BASELINES:
        key = name.replace("-", "_")
        if f"baseline_{key}" in figures:
            return name, figures[f"baseline_{key}"], figures.get(f"ratio_to_{key}")
    return None


def figures_table(d: dict[str, Any]) -> str:
    """The figures of a report (`BenchReport.as_dict`, or the median of several) as a table."""
    columns = [("dualwrite", d)]
    baseline = _baseline_of(d)
    if baseline is not None:
        columns.append((f"{baseline[0]} baseline", baseline[1]))

    def lat(figures: dict[str, Any], key: str) -> str:
        f = figures[key]
        return f"{f['p50']} / {f['p99']} / {f['p99.9']} ms" if f["count"] else "-"

    def each(render: Callable[[dict[str, Any]], str]) -> list[str]:
        return [render(f) for _, f in columns]

    rows: list[tuple[str, list[str]]] = [
        ("", [name for name, _ in columns]),
        ("target", each(lambda f: str(f["target"]))),
        ("realtime tier", each(lambda f: str(f["realtime"]))),
        ("permanent store", each(lambda f: str(f["store"]))),
        ("messages / concurrency", each(lambda f: f"{f['messages']} / {f['concurrency']}")),
    ]
    if d.get("rate"):
        rows.append(("send rate asked (sends/s)", each(lambda f: f"{f.get('rate') or '-'}")))
    rows += [
        ("subscribers", each(lambda f: str(f["subscribers"]))),
        ("acknowledged sends/s", each(lambda f: f"{f['sends_per_s']:,}")),
        ("send latency p50/p99/p99.9", each(lambda f: lat(f, "send_latency_ms"))),
        ("delivery p50/p99/p99.9", each(lambda f: lat(f, "delivery_latency_ms"))),
        (
            "outcomes",
            each(lambda f: ", ".join(f"{k}={v}" for k, v in sorted(f["outcomes"].items()))),
        ),
        ("CPU seconds / peak RSS", each(lambda f: f"{f['cpu_s']} s / {f['peak_rss_mb']} MB")),
    ]
    c = d.get("connections")
    if c is not None:
        deliveries = d["delivery_latency_ms"]["count"]
        rows += [
            (
                "sockets held / live",
                [f"{c['held']:,} / {c['live']:,} (connected in {c['connect_s']} s)"],
            ),
            (
                "server RSS before / idle / peak",
                [f"{c['rss_before_mb']} / {c['rss_idle_mb']} / {d['peak_rss_mb']} MB"],
            ),
            ("server RSS per idle connection", [f"{c['rss_per_connection_kb']} KB"]),
            (
                "frames delivered / expected",
                [
                    f"{deliveries:,} / {c['deliveries_expected']:,} "
                    f"({deliveries / d['elapsed_s'] if d['elapsed_s'] else 0:,.0f}/s)"
                ],
            ),
            (
                "bench client: loop lag p99 / max / CPU",
                [
                    f"{c['client_lag_ms']['p99']} / {c['client_lag_ms']['max']} ms / "
                    f"{c['client_cpu_s']} s "
                    f"({c['client_processes']} process{'es' if c['client_processes'] > 1 else ''})"
                ],
            ),
            (
                "server full collections during the sends",
                [
                    "unknown (the server's /metrics did not answer)"
                    if c.get("server_thaws") is None
                    else f"{c['server_thaws']} ({c.get('server_thaw_s', 0.0)} s)"
                ],
            ),
            ("CPU stolen by the host during the sends", [f"{c.get('steal_s', 0.0)} s"]),
        ]
    if baseline is not None and baseline[2] is not None:
        rows.append((f"dualwrite / {baseline[0]} (sends/s)", [str(baseline[2])]))
    return _align(rows)


def summary_line(d: dict[str, Any]) -> str:
    """One run's main figures on one line."""
    send, delivery = d["send_latency_ms"], d["delivery_latency_ms"]
    parts = [
        f"{d['sends_per_s']:,} sends/s",
        f"send p50/p99 {send['p50']}/{send['p99']} ms",
    ]
    if delivery["count"]:
        parts.append(f"delivery p50/p99 {delivery['p50']}/{delivery['p99']} ms")
    c = d.get("connections")
    if c is not None:
        parts.append(
            f"{c['live']:,}/{c['held']:,} sockets, {c['rss_per_connection_kb']} KB each, "
            f"peak RSS {d['peak_rss_mb']} MB"
        )
    baseline = _baseline_of(d)
    if baseline is not None:
        parts.append(f"{baseline[0]} {baseline[1]['sends_per_s']:,} sends/s")
        if baseline[2] is not None:
            parts.append(f"ratio {baseline[2]}")
    return ", ".join(parts)


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median of the runs' (a key a run lacks counts as 0: outcomes); text
    and lists as the first run has them."""
    merged: dict[str, Any] = {}
    keys = list(runs[0])
    keys += [k for run in runs[1:] for k in run if k not in keys]
    for key in keys:
        values = [run.get(key) for run in runs]
        sample = next((v for v in values if v is not None), None)
        if isinstance(sample, dict):
            merged[key] = median_figures([v if isinstance(v, dict) else {} for v in values])
        elif isinstance(sample, int | float) and not isinstance(sample, bool):
            numbers = [v if isinstance(v, int | float) else 0 for v in values]
            median = statistics.median(numbers)
            if all(isinstance(v, int) for v in numbers) and median == int(median):
                merged[key] = int(median)
            else:
                merged[key] = round(median, 3)
        else:
            merged[key] = sample
    return merged


def _align(rows: list[tuple[str, list[str]]]) -> str:
    """Rows of a label and values, each column as wide as its widest cell."""
    label_width = max(len(label) for label, _ in rows)
    widest = max(len(values) for _, values in rows)
    widths = [
        # A row with one value (a figure of the first column only) does not widen it.
        max(len(values[i]) for _, values in rows if len(values) > i and len(values) == widest)
        for i in range(widest)
    ]
    lines = []
    for label, values in rows:
        if len(values) < widest:
            lines.append(f"{label.ljust(label_width)}  " + "  |  ".join(values))
            continue
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
    return cpu, _status_mb(pid, "VmHWM:")


def process_rss(pid: int) -> float:
    """Resident memory (MB) of a process now, from /proc (Linux)."""
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def stolen_cpu_s() -> float:
    """CPU seconds stolen from this machine's cores by the hypervisor since boot (0 where
    `/proc/stat` does not say)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def settled(pid: int, *, quiet_cpu_s: float = 0.02, window_s: float = 0.5) -> None:
    """Wait (up to a minute) until the process spends under ``quiet_cpu_s`` of CPU in a window:
    the work a burst of connects started is done."""
    deadline = time.monotonic() + 60
    cpu, _ = process_usage(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(window_s)
        now, _ = process_usage(pid)
        if now - cpu < quiet_cpu_s:
            return
        cpu = now


SendOne = Callable[[int, int], Awaitable[str]]
"""(message index, sender slot) -> outcome: "saved", "pending" or "failed"."""


async def drive(
    send_one: SendOne,
    messages: int,
    concurrency: int,
    on_sent: Callable[[], None],
    rate: float | None = None,
) -> tuple[float, list[float], Counter[str], dict[int, float]]:
    """Run ``messages`` sends with at most ``concurrency`` in flight, message i starting at
    i / ``rate`` seconds if a rate is given (later if every sender is busy), else at once;
    returns elapsed, latencies (ms), outcomes and each message's start time (perf_counter),
    for delivery latency."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    started_at: dict[int, float] = {}
    next_index = 0
    began = time.perf_counter()

    async def sender(slot: int) -> None:
        nonlocal next_index
        while next_index < messages:
            index = next_index
            next_index += 1
            if rate:
                delay = began + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            started = started_at[index] = time.perf_counter()
            outcomes[await send_one(index, slot)] += 1
            latencies.append((time.perf_counter() - started) * 1000)
            on_sent()

    await asyncio.gather(*(sender(i) for i in range(concurrency)))
    return time.perf_counter() - began, latencies, outcomes, started_at


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
    rate: float | None = None,
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
    elapsed, latencies, outcomes, started_at = await drive(
        send_one, messages, concurrency, on_sent, rate
    )
    await asyncio.sleep(0.2)  # the last deliveries
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    cpu_after, peak = own_usage()
    return _channel_sends_report(
        "library",
        (dw.settings.realtime_url, dw.settings.store_url),
        (messages, concurrency, channels, rate),
        (elapsed, latencies, outcomes, started_at),
        arrived,
        cpu_after - cpu_before,
        peak,
    )


class _LagMonitor:
    """How late this event loop runs a 10 ms timer, while it runs."""

    def __init__(self) -> None:
        self.lag_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lag_ms.append(max(0.0, (time.perf_counter() - before - 0.01) * 1000))


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
    rate: float | None = None,
    on_sent: Callable[[], None] = lambda: None,
    out: TextIO | None = None,
    metrics_token: str | None = None,
) -> BenchReport:
    """N senders over HTTP and M WebSocket subscribers spread over the channels.

    In order: one send to each channel to warm the server up, its RSS; the sockets, opened
    `CONNECTS_IN_FLIGHT` at a time, each offering permessage-deflate as browsers do; one probe
    message per watched channel, until every socket has had its own (so every socket is known
    to be listening); once the server's CPU has settled, its RSS again (the difference, per
    socket, is what an idle connection costs); then the measured sends.

    The load comes from aiohttp: httpx's async client tops out near 200 requests/s here, which
    would measure the client, not the server. With ``metrics_token``, the server's `/metrics`
    is read before and after the sends, for the full collections it ran meanwhile.
    """
    import aiohttp

    say = out or sys.stderr
    headers = {"authorization": f"Bearer {token}"}
    first_frame = json.dumps({"token": token})
    arrivals: list[tuple[int, float]] = []
    statuses = {201: "saved", 202: "pending"}
    probed: set[int] = set()
    probes_due = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def post(channel: str, text: str) -> str:
            async with session.post(
                f"/api/workspaces/{WORKSPACE}/channels/{channel}/messages",
                json={"text": text},
                headers=headers,
            ) as response:
                await response.read()
                return statuses.get(response.status, "failed")

        # Warm-up: every channel is used once before the sockets open, as in a workspace that
        # exists already (a channel's first message announces it to every socket of the
        # workspace: thousands of frames, once, that the measurement is not about).
        warm_slots = asyncio.Semaphore(concurrency)

        async def warm(number: int) -> None:
            async with warm_slots:
                await post(f"channel-{number}", "bench warm-up")

        await asyncio.gather(*(warm(n) for n in range(channels)))
        await asyncio.sleep(0.5)  # the channels' announcements, after the answers
        before_sockets = process_rss(server_pid) if server_pid else 0.0

        connect_slots = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        opened = 0

        async def subscribe(number: int, channel: str) -> None:
            nonlocal opened
            path = f"/ws/workspaces/{WORKSPACE}/channels/{channel}"
            async with connect_slots:
                socket = await session.ws_connect(
                    path,
                    compress=15 if OFFER_DEFLATE else 0,
                    heartbeat=None,
                    headers=BROWSER_HEADERS,
                    origin=base_url,
                )
                # As the page does: the token is the first frame, never in the URL.
                await socket.send_str(first_frame)
            opened += 1
            async with socket:
                async for frame in socket:
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(frame.data)
                    if data.get("type") != "message":
                        continue  # notices (saved, channels) are not deliveries
                    text = data["text"]
                    index = index_of(text)
                    if index is not None:
                        arrivals.append((index, time.perf_counter()))
                    elif text == "bench probe" and number not in probed:
                        probed.add(number)
                        if len(probed) == subscribers:
                            probes_due.set()

        connect_started = time.perf_counter()
        listeners = [
            asyncio.create_task(subscribe(i, f"channel-{i % channels}")) for i in range(subscribers)
        ]
        ended: list[asyncio.Task[None]] = []
        for task in listeners:
            task.add_done_callback(ended.append)
        try:
            while opened < subscribers:
                if ended:
                    ended[0].result()  # raises why it could not connect
                    raise RuntimeError("a socket closed before the measurement")
                await asyncio.sleep(0.05)
            connect_s = time.perf_counter() - connect_started
            print(f"bench: {subscribers:,} sockets open in {connect_s:.1f} s", file=say)
            # A probe to each watched channel, again to those whose sockets have not all had
            # one, until every socket has: then each is known to be listening (an open socket
            # may still be signing in and watching its channel).
            probe_slots = asyncio.Semaphore(concurrency)

            async def probe(number: int) -> None:
                async with probe_slots:
                    await post(f"channel-{number}", "bench probe")

            deadline = time.monotonic() + 60
            while len(probed) < subscribers and time.monotonic() < deadline:
                missing = {i % channels for i in range(subscribers) if i not in probed}
                await asyncio.gather(*(probe(n) for n in sorted(missing)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(probes_due.wait(), 2)
            live = len(probed)
            if live < subscribers:
                print(f"bench: only {live:,} of {subscribers:,} sockets are live", file=say)
            idle = before_sockets
            if server_pid:
                await settled(server_pid)
                idle = process_rss(server_pid)

            async def send_one(index: int, slot: int) -> str:
                return await post(f"channel-{index % channels}", text_of(index))

            async def server_thaws() -> tuple[int, float] | None:
                if metrics_token is None:
                    return None
                return await _thaws(session, metrics_token)

            # This process's own collections would walk what its sockets hold (a full one took
            # 400 ms at 10,000, seen as a burst of late sends): not the server's latency. So it
            # keeps them short as serve does.
            gc.collect()
            async with short_full_collections(3600):
                lag = _LagMonitor()
                lag.start()
                client_before, _ = own_usage()
                thaws_before = await server_thaws()
                steal_before = stolen_cpu_s()
                before = process_usage(server_pid) if server_pid else (0.0, 0.0)
                elapsed, latencies, outcomes, started_at = await drive(
                    send_one, messages, concurrency, on_sent, rate
                )
                await asyncio.sleep(1.0)  # the last deliveries
                after = process_usage(server_pid) if server_pid else (0.0, 0.0)
                thaws_after = await server_thaws()
                steal_after = stolen_cpu_s()
                client_after, _ = own_usage()
                await lag.stop()
        finally:
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
    per_channel = Counter(i % channels for i in range(subscribers))
    expected = sum(per_channel[i % channels] for i in range(messages))
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
        rate=rate,
        channels=channels,
        connections=Connections(
            held=subscribers,
            live=live,
            connect_s=connect_s,
            rss_before_mb=before_sockets,
            rss_idle_mb=idle,
            deliveries_expected=expected,
            client_lag_ms=lag.lag_ms,
            client_cpu_s=client_after - client_before,
            server_thaws=(
                thaws_after[0] - thaws_before[0] if thaws_before and thaws_after else None
            ),
            server_thaw_s=thaws_after[1] - thaws_before[1] if thaws_before and thaws_after else 0.0,
            steal_s=steal_after - steal_before,
        ),
    )


async def _thaws(session: aiohttp.ClientSession, metrics_token: str) -> tuple[int, float] | None:
    """How many full collections of its thawed heap the server has run, and their seconds in
    all, from its `/metrics`; None if it does not answer (the run's figures stand without)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {metrics_token}"}
    try:
        async with asyncio.timeout(10):
            async with session.get("/metrics", headers=headers) as response:
                response.raise_for_status()
                text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    count, seconds = 0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "dualwrite_gc_thaw_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count = int(sample.value)
                elif sample.name.endswith("_sum"):
                    seconds = sample.value
    return count, seconds


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


async def run_raw_batched(
    realtime_url: str,
    store_url: str,
    *,
    messages: int,
    concurrency: int,
    channels: int,
    rate: float | None = None,
    on_sent: Callable[[], None] = lambda: None,
) -> BenchReport | None:
    """The batched bare-client baseline (`dualwrite.tools.bench_batched`) at the same
    concurrency, channels and rate, or None where these backends have none."""
    from dualwrite.tools.bench_batched import raw_batched

    names = [f"channel-{i}" for i in range(channels)]
    arrived: dict[int, float] = {}

    def arrival(index: int) -> None:
        arrived[index] = time.perf_counter()

    async with raw_batched(realtime_url, store_url, names, arrival) as batches:
        if batches is None:
            return None
        sender = batches

        async def send_one(index: int, slot: int) -> str:
            await sender.send(index, names[index % channels])
            return "saved"

        cpu_before, _ = own_usage()
        elapsed, latencies, outcomes, started_at = await drive(
            send_one, messages, concurrency, on_sent, rate
        )
        await asyncio.sleep(0.2)  # the last deliveries
        cpu_after, peak = own_usage()
    return _channel_sends_report(
        "raw-batched",
        (realtime_url, store_url),
        (messages, concurrency, channels, rate),
        (elapsed, latencies, outcomes, started_at),
        arrived,
        cpu_after - cpu_before,
        peak,
    )


def _channel_sends_report(
    target: str,
    urls: tuple[str, str],
    load: tuple[int, int, int, float | None],
    driven: tuple[float, list[float], Counter[str], dict[int, float]],
    arrived: dict[int, float],
    cpu_s: float,
    peak_rss_mb: float,
) -> BenchReport:
    """The report of a run that sent over ``channels`` with one in-process listener each
    (the library target and its batched baseline): ``driven`` is what `drive` returned,
    ``arrived`` when each message reached its listener."""
    messages, concurrency, channels, rate = load
    elapsed, latencies, outcomes, started_at = driven
    return BenchReport(
        target,
        *urls,
        messages,
        concurrency,
        channels,
        elapsed,
        latencies,
        [(arrived[i] - started_at[i]) * 1000 for i in arrived if i in started_at],
        outcomes,
        cpu_s,
        peak_rss_mb,
        rate=rate,
        channels=channels,
    )


def write_json(path: str, figures: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def server_env(settings: Settings, scratch: str, secret: str, sockets: int) -> dict[str, str]:
    """The environment of the bench's `serve` process: these backends, and no per-user limit
    in the way (one bench user sends everything and holds every socket)."""
    return {
        **os.environ,
        "DUALWRITE_TOKEN_SECRET": secret,
        "DUALWRITE_REALTIME_URL": settings.realtime_url,
        "DUALWRITE_STORE_URL": settings.store_url,
        "DUALWRITE_QUEUE_PATH": str(Path(scratch, "server-queue.db")),
        "DUALWRITE_SEND_RATE_PER_S": "0",
        "DUALWRITE_SEND_BYTES_PER_S": "0",
        "DUALWRITE_CHANNEL_BYTES_PER_S": "0",
        "DUALWRITE_READ_RATE_PER_S": "0",
        "DUALWRITE_WS_MAX_PER_USER": str(max(100_000, sockets + 100)),
        "DUALWRITE_WS_MAX_SOCKETS": str(max(10_000, sockets + 100)),
        # The bench opens CONNECTS_IN_FLIGHT sockets at a time, all from one address.
        "DUALWRITE_WS_MAX_UNAUTHENTICATED_PER_ADDRESS": str(CONNECTS_IN_FLIGHT * 4),
        "DUALWRITE_WS_MAX_UNAUTHENTICATED": str(CONNECTS_IN_FLIGHT * 4),
    }


@dataclass(frozen=True)
class BenchServer:
    """The bench's `serve` process: where it listens, a signed-in user's token, its pid, and
    the token of its `/metrics`."""

    base_url: str
    token: str
    pid: int
    metrics_token: str


@contextlib.contextmanager
def bench_server(settings: Settings, scratch: str, sockets: int = 0) -> Iterator[BenchServer]:
    """A `dualwrite serve` process on these backends, for the http target."""
    from dualwrite.server.auth import Identity, TokenSigner
    from dualwrite.tools.serve_process import serve_process

    secret = secrets.token_urlsafe(48)
    metrics_token = secrets.token_urlsafe(24)
    env = server_env(settings, scratch, secret, sockets)
    env["DUALWRITE_METRICS_TOKEN"] = metrics_token
    with serve_process(env, Path(scratch, "server.log")) as (base, pid):
        token = TokenSigner(secret, ServerSettings()).mint(
            Identity(User("bench-user", "Bench"), "bench")
        )
        yield BenchServer(base, token, pid, metrics_token)
