"""dualwrite: send chat messages to a realtime tier first and a permanent store second.

    async with open_dualwrite() as dw:
        result = await dw.send_message("ws1", "general", "hello", User("u1", "Ada"))
        result.message_id, result.status   # "saved", or "pending" with result.warning

See the README for the send semantics and the backends.
"""

from dualwrite.errors import (
    NOT_SAVED_WARNING,
    SEND_FAILED_TEXT,
    BackendError,
    BackendTimeout,
    DualWriteError,
    InvalidInput,
    NotQueued,
    SendFailed,
    TextTooLong,
    UnknownBackend,
)
from dualwrite.model import ChannelMessage, SendResult, StoredMessage, User
from dualwrite.runtime import DualWrite, open_dualwrite
from dualwrite.settings import Settings

__all__ = [
    "NOT_SAVED_WARNING",
    "SEND_FAILED_TEXT",
    "BackendError",
    "BackendTimeout",
    "ChannelMessage",
    "DualWrite",
    "DualWriteError",
    "InvalidInput",
    "NotQueued",
    "SendFailed",
    "SendResult",
    "Settings",
    "StoredMessage",
    "TextTooLong",
    "UnknownBackend",
    "User",
    "open_dualwrite",
]
