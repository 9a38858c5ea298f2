"""The durable retry queue: permanent writes that failed, kept on local disk until they land.

SQLite in WAL mode with synchronous=FULL: once `put` returns, the entry survives the process
being killed and the machine losing power. A send answers "pending" only after that.

Several processes may share one file (`serve --workers N`, and the CLI's `queue` commands
beside a running `serve`): SQLite locks the file for each write, and a retrier takes due
entries with `claim`, which moves them out of the others' reach for a lease, so that workers
drain different entries rather than the same ones in step.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dualwrite._sqlite import SqliteThread
from dualwrite.model import ChannelRef, PermanentWrite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_writes (
    workspace_id    TEXT NOT NULL,
    channel_id      TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    user_name       TEXT NOT NULL,
    text            TEXT NOT NULL,
    sent_at         INTEGER NOT NULL,
    enqueued_at     INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (workspace_id, channel_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_writes_due ON pending_writes (next_attempt_at);
CREATE INDEX IF NOT EXISTS pending_writes_id ON pending_writes (message_id);
"""

_COLUMNS = (
    "workspace_id, channel_id, message_id, user_id, user_name, text, sent_at, "
    "enqueued_at, attempts, next_attempt_at, last_error"
)


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    """One waiting permanent write and its retry bookkeeping (times in ms since the epoch)."""

    write: PermanentWrite
    enqueued_at: int
    attempts: int
    next_attempt_at: int
    last_error: str

    @property
    def message_id(self) -> str:
        return self.write.message_id


class RetryQueue:
    """Failed permanent writes, keyed by channel and message id (a write is queued once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = SqliteThread(path, synchronous="FULL", schema=_SCHEMA, name="dualwrite-queue")

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def put(self, write: PermanentWrite, error: str, now_ms: int) -> None:
        """Queue ``write``, due at once; a write already queued keeps its history."""
        await self._db.call(_put, write, error, now_ms)

    async def due(self, now_ms: int, limit: int) -> list[QueuedWrite]:
        """Entries whose next attempt is due, the longest-waiting first."""
        return await self._db.call(_select, _DUE, now_ms, limit)

    async def claim(self, now_ms: int, limit: int, lease_until_ms: int) -> list[QueuedWrite]:
        """Take the due entries (as `due`) for one retrier: in one transaction they are made
        due again only at ``lease_until_ms``, so that another process sharing this file skips
        them meanwhile. Each entry comes back as it was (its own ``next_attempt_at``); one
        whose attempt never comes (the process died) is due again when the lease ends."""
        return await self._db.call(_claim, now_ms, limit, lease_until_ms)

    async def release(self, entries: list[QueuedWrite], lease_until_ms: int) -> None:
        """Give back claimed entries that were not attempted: each is due again at its own
        time, unless it changed since (attempted, rescheduled or removed by someone else)."""
        if entries:
            await self._db.call(_release, entries, lease_until_ms)

    async def find(self, message_id: str) -> QueuedWrite | None:
        found = await self._db.call(_select, "WHERE message_id = ? LIMIT 1", message_id)
        return found[0] if found else None

    async def entries(
        self, limit: int, user_id: str | None = None, workspace_id: str | None = None
    ) -> list[QueuedWrite]:
        """Waiting entries in the order they were queued, optionally of one user (and one
        workspace) only. The filters apply before the limit."""
        conditions = [
            (f"{column} = ?", value)
            for column, value in (("user_id", user_id), ("workspace_id", workspace_id))
            if value is not None
        ]
        where = " AND ".join(c for c, _ in conditions)
        return await self._db.call(
            _select,
            (f"WHERE {where} " if where else "") + "ORDER BY enqueued_at, message_id LIMIT ?",
            *(v for _, v in conditions),
            limit,
        )

    async def count(self) -> int:
        return await self._db.call(_count)

    async def reschedule(self, entry: QueuedWrite, next_attempt_at: int, error: str) -> None:
        await self._db.call(_reschedule, entry.write, next_attempt_at, error)

    async def remove(self, channel: ChannelRef, message_id: str) -> None:
        await self._db.call(_remove, channel, message_id)


def _put(db: sqlite3.Connection, write: PermanentWrite, error: str, now_ms: int) -> None:
    db.execute(
        f"INSERT INTO pending_writes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?) "
        "ON CONFLICT DO UPDATE SET next_attempt_at = excluded.next_attempt_at, "
        "last_error = excluded.last_error",
        (
            write.channel.workspace_id,
            write.channel.channel_id,
            write.message_id,
            write.user_id,
            write.user_name,
            write.text,
            write.sent_at,
            now_ms,
            now_ms,
            error,
        ),
    )


def _select(db: sqlite3.Connection, clause: str, *params: object) -> list[QueuedWrite]:
    rows = db.execute(f"SELECT {_COLUMNS} FROM pending_writes {clause}", params).fetchall()
    return [
        QueuedWrite(
            write=PermanentWrite(
                channel=ChannelRef(ws, ch),
                message_id=message_id,
                user_id=user_id,
                user_name=user_name,
                text=text,
                sent_at=sent_at,
                keep_sent_time=True,
            ),
            enqueued_at=enqueued_at,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            last_error=last_error,
        )
        for (
            ws,
            ch,
            message_id,
            user_id,
            user_name,
            text,
            sent_at,
            enqueued_at,
            attempts,
            next_attempt_at,
            last_error,
        ) in rows
    ]


_DUE = "WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
_KEY = "workspace_id = ? AND channel_id = ? AND message_id = ?"


def _key(write: PermanentWrite) -> tuple[str, str, str]:
    return (write.channel.workspace_id, write.channel.channel_id, write.message_id)


def _claim(
    db: sqlite3.Connection, now_ms: int, limit: int, lease_until_ms: int
) -> list[QueuedWrite]:
    # Nothing due (the usual case): a read, no write lock.
    anything = "SELECT 1 FROM pending_writes WHERE next_attempt_at <= ? LIMIT 1"
    if db.execute(anything, (now_ms,)).fetchone() is None:
        return []
    # IMMEDIATE: the write lock is taken before the read, so that two processes cannot both
    # read the same due entries and then both take them.
    db.execute("BEGIN IMMEDIATE")
    try:
        entries = _select(db, _DUE, now_ms, limit)
        db.executemany(
            f"UPDATE pending_writes SET next_attempt_at = ? WHERE {_KEY}",
            [(lease_until_ms, *_key(entry.write)) for entry in entries],
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return entries


def _release(db: sqlite3.Connection, entries: list[QueuedWrite], lease_until_ms: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(
            f"UPDATE pending_writes SET next_attempt_at = ? WHERE {_KEY} AND next_attempt_at = ?",
            [(e.next_attempt_at, *_key(e.write), lease_until_ms) for e in entries],
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _count(db: sqlite3.Connection) -> int:
    (count,) = db.execute("SELECT count(*) FROM pending_writes").fetchone()
    return int(count)


def _reschedule(
    db: sqlite3.Connection, write: PermanentWrite, next_attempt_at: int, error: str
) -> None:
    db.execute(
        "UPDATE pending_writes SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
        "WHERE workspace_id = ? AND channel_id = ? AND message_id = ?",
        (
            next_attempt_at,
            error,
            write.channel.workspace_id,
            write.channel.channel_id,
            write.message_id,
        ),
    )


def _remove(db: sqlite3.Connection, channel: ChannelRef, message_id: str) -> None:
    db.execute(
        "DELETE FROM pending_writes WHERE workspace_id = ? AND channel_id = ? AND message_id = ?",
        (channel.workspace_id, channel.channel_id, message_id),
    )
