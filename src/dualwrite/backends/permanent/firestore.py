"""Cloud Firestore permanent store (`firestore://PROJECT_ID`), google-cloud-firestore's AsyncClient.

Documents are the story's (docs/story.md): `workspaces/{ws}/channels/{ch}/messages/{id}`
with {messageId, channelId, workspaceId, userId, userName, text, timestamp, createdAt}, the
two times as Firestore timestamps. A write is a `create()` by explicit id (never `add()`): a
second write of the same id fails with AlreadyExists and leaves the first, which is the
idempotence we want.
History pages order by (timestamp desc, messageId desc), which needs the composite index in
firestore.indexes.json. A channel added before it holds a message is the document
`workspaces/{ws}/channels/{ch}`; the channel list is that collection's documents, listed with
the missing ones (a channel holding messages has the subcollection without the document).
Credentials: Google's defaults (`GOOGLE_APPLICATION_CREDENTIALS`);
`FIRESTORE_EMULATOR_HOST` points the client at an emulator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from google.api_core.exceptions import AlreadyExists
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

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

_MAX_BATCH = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _to_datetime(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def _to_ms(value: datetime) -> int:
    """Whole milliseconds, rounded down: server timestamps carry microseconds."""
    return (value - _EPOCH) // _MS


class FirestorePermanentStore:
    def __init__(self, project: str, timeout_s: float) -> None:
        self._project = project
        self._timeout_s = timeout_s
        self._client: Any = None  # firestore.AsyncClient; its close() is untyped

    async def connect(self) -> None:
        self._client = firestore.AsyncClient(project=self._project)

    async def close(self) -> None:
        if self._client is not None:
            # AsyncClient.close() closes only its HTTP session; the gRPC channel belongs to
            # the transport it made on first use, and is closed here.
            transport = getattr(self._client, "_transport", None)
            if transport is not None:
                await transport.close()
            self._client.close()
            self._client = None

    def _messages(self, channel: ChannelRef) -> Any:
        if self._client is None:
            raise RuntimeError("FirestorePermanentStore is not connected")
        return self._client.collection(channel.permanent_path)

    async def save(self, write: PermanentWrite) -> None:
        document = self._messages(write.channel).document(write.message_id)
        # The first write of an id wins; a repeat is a success that changes nothing.
        with contextlib.suppress(AlreadyExists):
            await document.create(_document(write), timeout=self._timeout_s)

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        """Batched creates, at most 500 per batch (Firestore's limit). A batch holding an id
        that exists fails whole (AlreadyExists); its writes are then created one by one."""
        if self._client is None:
            raise RuntimeError("FirestorePermanentStore is not connected")
        for start in range(0, len(writes), _MAX_BATCH):
            chunk = writes[start : start + _MAX_BATCH]
            batch = self._client.batch()
            for write in chunk:
                batch.create(
                    self._messages(write.channel).document(write.message_id), _document(write)
                )
            try:
                await batch.commit(timeout=self._timeout_s)
            except AlreadyExists:
                for write in chunk:
                    await self.save(write)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        snapshot = await self._messages(channel).document(message_id).get(timeout=self._timeout_s)
        return _to_message(channel, snapshot.to_dict()) if snapshot.exists else None

    async def find(self, message_id: str) -> StoredMessage | None:
        """A collection-group query on the `messageId` field every document carries; it needs
        the collection-group index of firestore.indexes.json (without it Firestore refuses the
        query: an error, never a false "absent"). Other collections named `messages` are
        skipped by their path."""
        if self._client is None:
            raise RuntimeError("FirestorePermanentStore is not connected")
        query = self._client.collection_group("messages").where(
            filter=FieldFilter("messageId", "==", message_id)
        )
        for snapshot in await query.limit(10).get(timeout=self._timeout_s):
            path = snapshot.reference.path.split("/")
            if len(path) == 6 and path[0] == "workspaces" and path[2] == "channels":
                return _to_message(ChannelRef(path[1], path[3]), snapshot.to_dict())
        return None

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        if not message_ids:
            return {}
        documents = [self._messages(channel).document(i) for i in message_ids]
        found: dict[str, StoredMessage] = {}
        # get_all: one BatchGetDocuments call for the whole list.
        async for snapshot in self._client.get_all(documents, timeout=self._timeout_s):
            if snapshot.exists:
                message = _to_message(channel, snapshot.to_dict())
                found[message.message_id] = message
        return found

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        """Pages by whole milliseconds, like every store, though Firestore keeps microseconds:
        the query starts at the cursor's millisecond and reads on until the last millisecond it
        touched is complete, and the page is ordered and cut here."""
        ordered = (
            self._messages(channel)
            .order_by("timestamp", direction=firestore.Query.DESCENDING)
            .order_by("messageId", direction=firestore.Query.DESCENDING)
        )
        bound = parse_history_cursor(before) if before is not None else None
        query = ordered
        if bound is not None:
            query = ordered.start_after({"timestamp": _to_datetime(bound[0] + 1), "messageId": ""})
        batch_size = limit + 1 + 16
        found: list[StoredMessage] = []
        while True:
            snapshots = await query.limit(batch_size).get(timeout=self._timeout_s)
            batch = [_to_message(channel, s.to_dict()) for s in snapshots]
            found += [m for m in batch if bound is None or (m.timestamp, m.message_id) < bound]
            if len(snapshots) < batch_size:
                break
            last_ms = batch[-1].timestamp
            if sum(1 for m in found if m.timestamp > last_ms) >= limit + 1:
                found = [m for m in found if m.timestamp > last_ms]
                break
            query = ordered.start_after(snapshots[-1])
        found.sort(key=lambda m: (m.timestamp, m.message_id), reverse=True)
        return HistoryPage.from_candidates(found[: limit + 1], limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        if self._client is None:
            raise RuntimeError("FirestorePermanentStore is not connected")
        document = self._client.document(
            f"workspaces/{channel.workspace_id}/channels/{channel.channel_id}"
        )
        with contextlib.suppress(AlreadyExists):
            await document.create(
                {
                    "workspaceId": channel.workspace_id,
                    "channelId": channel.channel_id,
                    "createdAt": firestore.SERVER_TIMESTAMP,
                },
                timeout=self._timeout_s,
            )

    async def channels(self, workspace_id: str) -> list[str]:
        if self._client is None:
            raise RuntimeError("FirestorePermanentStore is not connected")
        collection = self._client.collection(f"workspaces/{workspace_id}/channels")
        # list_documents shows missing documents too: a channel that holds only messages.
        return sorted([ref.id async for ref in collection.list_documents(timeout=self._timeout_s)])


def _document(write: PermanentWrite) -> dict[str, Any]:
    return {
        "messageId": write.message_id,
        "channelId": write.channel.channel_id,
        "workspaceId": write.channel.workspace_id,
        "userId": write.user_id,
        "userName": write.user_name,
        "text": write.text,
        "timestamp": _to_datetime(write.sent_at)
        if write.keep_sent_time
        else firestore.SERVER_TIMESTAMP,
        "createdAt": firestore.SERVER_TIMESTAMP,
    }


def _to_message(channel: ChannelRef, data: dict[str, Any]) -> StoredMessage:
    return StoredMessage(
        channel=channel,
        message_id=data["messageId"],
        user_id=data["userId"],
        user_name=data["userName"],
        text=data["text"],
        timestamp=_to_ms(data["timestamp"]),
        created_at=_to_ms(data["createdAt"]),
    )


def create(url: str, context: BackendContext) -> PermanentStore:
    project = urlsplit(url).netloc
    if not project:
        raise UnknownBackend(f"expected firestore://PROJECT_ID, got {url!r}")
    return FirestorePermanentStore(project, context.call_timeout_s)
