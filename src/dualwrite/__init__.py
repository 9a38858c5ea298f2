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
    BadSetting,
    ClientMessageIdReused,
    DualWriteError,
    InvalidInput,
    MessageNotFound,
    NotQueued,
    SendFailed,
    TextTooLong,
    UnknownBackend,
)
from dualwrite.model import ChannelHistory, ChannelMessage, SendResult, StoredMessage, User
from dualwrite.recovery import Inspection
from dualwrite.runtime import open_dualwrite
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings, Settings

__all__ = [
    "NOT_SAVED_WARNING",
    "SEND_FAILED_TEXT",
    "BackendError",
    "BackendTimeout",
    "BadSetting",
    "ChannelHistory",
    "ChannelMessage",
    "ClientMessageIdReused",
    "DualWrite",
    "DualWriteError",
    "Inspection",
    "InvalidInput",
    "MessageNotFound",
    "NotQueued",
    "SendFailed",
    "SendResult",
    "ServerSettings",
    "Settings",
    "StoredMessage",
    "TextTooLong",
    "UnknownBackend",
    "User",
    "open_dualwrite",
]
