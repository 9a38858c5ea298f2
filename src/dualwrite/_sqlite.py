"""One SQLite connection owned by one thread, driven from asyncio.

sqlite3 blocks; running every call on a single dedicated thread keeps the event loop free and
serialises writers, which SQLite wants anyway.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class SqliteThread:
    """Opens ``path`` in WAL mode with ``synchronous`` as given, then runs ``schema``."""

    def __init__(self, path: str, *, synchronous: str, schema: str, name: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._schema = schema
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        await self.call(lambda _conn: None)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self.call(lambda conn: conn.close())
        self._executor.shutdown(wait=True)
        self._executor = None
        self._conn = None

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(connection, *args)`` on the connection's thread."""
        if self._executor is None:
            raise RuntimeError(f"{self._path} is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: fn(self._connection(), *args, **kwargs)
        )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(self._schema)
            self._conn = conn
        return self._conn
