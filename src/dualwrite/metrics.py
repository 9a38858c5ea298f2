"""Prometheus metrics. They live in the library so every entry point (server, CLI) reports them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SENDS = Counter(
    "dualwrite_sends", "Sends by outcome: saved, pending, failed, invalid.", ["outcome"]
)
REALTIME_WRITE_SECONDS = Histogram(
    "dualwrite_realtime_write_seconds", "Realtime-tier write latency (successful writes)."
)
PERMANENT_WRITE_SECONDS = Histogram(
    "dualwrite_permanent_write_seconds", "Permanent-store write latency (successful writes)."
)
RETRIES = Counter(
    "dualwrite_retries", "Permanent-write retries by outcome: saved, failed.", ["outcome"]
)
QUEUE_DEPTH = Gauge("dualwrite_retry_queue_depth", "Permanent writes waiting in the retry queue.")
WEBSOCKETS = Gauge("dualwrite_websocket_connections", "Live WebSocket connections.")
GC_THAW_SECONDS = Histogram(
    "dualwrite_gc_thaw_seconds",
    "Full collections of a serve process's thawed heap (the loop is held meanwhile).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
