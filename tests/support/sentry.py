"""A stand-in Sentry ingest endpoint: records every envelope a real sentry-sdk posts to it."""

from __future__ import annotations

import contextlib
import gzip
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Ingest(BaseHTTPRequestHandler):
    envelopes: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        encoding = self.headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding == "br":  # pragma: no cover - only if brotli is installed
            import brotli  # type: ignore[import-not-found]

            body = brotli.decompress(body)
        self.server.envelopes.append(body.decode("utf-8", "replace"))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_sentry() -> Iterator[tuple[str, list[str]]]:
    """Yield (a DSN pointing here, the envelopes received so far, as text)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ingest)
    server.envelopes = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://public@127.0.0.1:{server.server_port}/1", server.envelopes  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
