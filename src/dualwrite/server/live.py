"""Live frames: a `LiveEntry` as the JSON object a socket sends (the WebSocket contract).

The fan-out itself is `dualwrite.live` (one feed per process); this module only encodes, once
per entry however many sockets send it.
"""

from __future__ import annotations

import functools
import json

from dualwrite.model import LiveEntry


@functools.lru_cache(maxsize=512)  # entries go out to their sockets within moments
def encode(entry: LiveEntry) -> str:
    """`{"type": "message", "messageId", "workspaceId", "channelId", "userId", "userName",
    "text", "timestamp", "ttl", "cursor"}`; the client resumes with `?cursor=` the last one."""
    return json.dumps(
        {
            "type": "message",
            "messageId": entry.message.message_id,
            "workspaceId": entry.channel.workspace_id,
            "channelId": entry.channel.channel_id,
            **entry.message.to_wire(),
            "cursor": entry.cursor,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
