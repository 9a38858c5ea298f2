"""SQLite permanent store: the embedded default (`sqlite:///relative.db`, `sqlite:////abs.db`).

WAL with synchronous=NORMAL: a committed message survives the process dying, not a power loss.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from urllib.parse import urlsplit

from dualwrite._sqlite import SqliteThread
from dualwrite.backends import BackendContext
from dualwrite.errors import UnknownBackend
from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    PermanentWrite,
    StoredMessage,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore

# SQLite's own clock, in milliseconds: the store's "server time".
_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    workspace_id TEXT NOT NULL,
    channel_id   TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    user_name    TEXT NOT NULL,
    text         TEXT NOT NULL,
    timestamp    INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, channel_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_history
    ON messages (workspace_id, channel_id, timestamp, message_id);
CREATE TABLE IF NOT EXISTS channels (
    workspace_id TEXT NOT NULL,
    channel_id   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, channel_id)
) WITHOUT ROWID;
"""

_COLUMNS = "workspace_id, channel_id, message_id, user_id, user_name, text, timestamp, created_at"


def sqlite_path(url: str) -> str:
    """The file a `sqlite://` URL names: three slashes relative, four absolute."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise UnknownBackend(
            f"expected sqlite:///relative/path or sqlite:////absolute, got {url!r}"
        )
    path = parts.path[1:]
    if not path:
        raise UnknownBackend(f"{url!r} names no file")
    return path


class SqlitePermanentStore:
    def __init__(self, path: str) -> None:
        self._db = SqliteThread(
            path, synchronous="NORMAL", schema=_SCHEMA, name="dualwrite-sqlite-store"
        )

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def save(self, write: PermanentWrite) -> None:
        await self._db.call(_save, write)

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        await self._db.call(_save_many, writes)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        return await self._db.call(_get, channel, message_id)

    async def find(self, message_id: str) -> StoredMessage | None:
        return await self._db.call(_find, message_id)

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        return await self._db.call(_get_many, channel, list(message_ids))

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        bound = parse_history_cursor(before) if before is not None else None
        return await self._db.call(_history, channel, bound, limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        await self._db.call(_add_channel, channel)

    async def channels(self, workspace_id: str) -> list[str]:
        return await self._db.call(_channels, workspace_id)


# The channels holding messages, one index seek per channel (a loose index scan) rather than a
# scan of every message of the workspace; then those added without a message yet.
CHANNELS_QUERY = """
WITH RECURSIVE held(ch) AS (
    SELECT MIN(channel_id) FROM {messages} WHERE workspace_id = {p}
    UNION ALL
    SELECT (SELECT MIN(channel_id) FROM {messages} WHERE workspace_id = {p} AND channel_id > ch)
    FROM held WHERE ch IS NOT NULL
)
SELECT ch FROM held WHERE ch IS NOT NULL
UNION
SELECT channel_id FROM {channels} WHERE workspace_id = {p}
ORDER BY 1
"""


def _add_channel(db: sqlite3.Connection, channel: ChannelRef) -> None:
    db.execute(
        f"INSERT INTO channels VALUES (?, ?, {_NOW_MS}) ON CONFLICT DO NOTHING",
        (channel.workspace_id, channel.channel_id),
    )


def _channels(db: sqlite3.Connection, workspace_id: str) -> list[str]:
    query = CHANNELS_QUERY.format(messages="messages", channels="channels", p="?")
    return [row[0] for row in db.execute(query, (workspace_id,) * 3)]


_INSERT = (
    f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, "
    f"COALESCE(?, {_NOW_MS}), {_NOW_MS}) ON CONFLICT DO NOTHING"
)


def _save(db: sqlite3.Connection, write: PermanentWrite) -> None:
    db.execute(_INSERT, write.as_row())


def _save_many(db: sqlite3.Connection, writes: Sequence[PermanentWrite]) -> None:
    # One transaction: one fsync of the WAL for the whole batch.
    with db:
        db.execute("BEGIN")
        db.executemany(_INSERT, [w.as_row() for w in writes])


def _get(db: sqlite3.Connection, channel: ChannelRef, message_id: str) -> StoredMessage | None:
    row = db.execute(
        f"SELECT {_COLUMNS} FROM messages "
        "WHERE workspace_id = ? AND channel_id = ? AND message_id = ?",
        (channel.workspace_id, channel.channel_id, message_id),
    ).fetchone()
    return _to_message(row) if row else None


def _find(db: sqlite3.Connection, message_id: str) -> StoredMessage | None:
    # A scan of the table: no index serves the id alone, and `inspect` is the only caller;
    # an index would cost every write for it.
    row = db.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE message_id = ? LIMIT 1", (message_id,)
    ).fetchone()
    return _to_message(row) if row else None


def _get_many(
    db: sqlite3.Connection, channel: ChannelRef, message_ids: list[str]
) -> dict[str, StoredMessage]:
    found: dict[str, StoredMessage] = {}
    # Chunks stay under SQLite's bound-parameter limit (999 on old builds).
    for start in range(0, len(message_ids), 900):
        chunk = message_ids[start : start + 900]
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE workspace_id = ? AND channel_id = ? "
            f"AND message_id IN ({', '.join('?' * len(chunk))})",
            (channel.workspace_id, channel.channel_id, *chunk),
        ).fetchall()
        found.update((row[2], _to_message(row)) for row in rows)
    return found


def _history(
    db: sqlite3.Connection, channel: ChannelRef, bound: tuple[int, str] | None, limit: int
) -> HistoryPage:
    where = "workspace_id = ? AND channel_id = ?"
    params: list[object] = [channel.workspace_id, channel.channel_id]
    if bound is not None:
        where += " AND (timestamp, message_id) < (?, ?)"
        params += list(bound)
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE {where} "
        "ORDER BY timestamp DESC, message_id DESC LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    return HistoryPage.from_candidates([_to_message(r) for r in rows], limit)


def _to_message(row: tuple[str, str, str, str, str, str, int, int]) -> StoredMessage:
    ws, ch, message_id, user_id, user_name, text, timestamp, created_at = row
    return StoredMessage(
        ChannelRef(ws, ch), message_id, user_id, user_name, text, timestamp, created_at
    )


def create(url: str, context: BackendContext) -> PermanentStore:
    return SqlitePermanentStore(sqlite_path(url))
