"""Input checks, run before any write so that refused input leaves nothing behind.

Ids must be valid as Realtime Database keys and as Firestore document ids at once, since the
same id names a record in both tiers.
"""

from __future__ import annotations

import functools
import re

from dualwrite.errors import InvalidInput, TextTooLong
from dualwrite.model import ChannelRef, User

MAX_ID_BYTES = 768
MAX_USER_NAME_CHARS = 256

_FORBIDDEN_IN_ID = re.compile(r"[.$#\[\]/\x00-\x1f\x7f]")
_FIRESTORE_RESERVED_ID = re.compile(r"^__.*__$")


def check_id(field: str, value: object) -> str:
    if not isinstance(value, str) or value == "":
        raise InvalidInput(field, "must be a non-empty string")
    return _checked_id(field, value)


@functools.lru_cache(maxsize=4096)
def _checked_id(field: str, value: str) -> str:
    """A string id checked, remembered while it is among the last few thousand that passed
    (every send checks the same workspace, channel and user ids again; a refusal raises and
    is not remembered)."""
    _check_encodable(field, value)
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidInput(field, f"must be at most {MAX_ID_BYTES} bytes in UTF-8")
    bad = _FORBIDDEN_IN_ID.search(value)
    if bad:
        raise InvalidInput(
            field, f"must not contain {bad.group()!r} (none of . $ # [ ] / or control characters)"
        )
    if _FIRESTORE_RESERVED_ID.match(value):
        raise InvalidInput(field, "must not start and end with '__' (reserved by Firestore)")
    return value


def check_text(value: object, max_chars: int) -> str:
    """Message text: any Unicode but NUL, not blank, at most ``max_chars`` code points.

    Newlines, tabs and other control characters are kept as sent. NUL is refused because
    PostgreSQL's text type cannot hold it, and a message must read back as it was written.
    """
    if not isinstance(value, str):
        raise InvalidInput("text", "must be a string")
    if value.strip() == "":
        raise InvalidInput("text", "must not be empty")
    if len(value) > max_chars:
        raise TextTooLong("text", f"must be at most {max_chars} characters (got {len(value)})")
    if "\x00" in value:
        raise InvalidInput("text", "must not contain NUL characters")
    _check_encodable("text", value)
    return value


def check_user(user: object) -> User:
    if not isinstance(user, User):
        raise InvalidInput("user", "must be a dualwrite.User")
    check_id("user.id", user.id)
    if not isinstance(user.name, str) or user.name.strip() == "":
        raise InvalidInput("user.name", "must be a non-empty string")
    if len(user.name) > MAX_USER_NAME_CHARS:
        raise InvalidInput("user.name", f"must be at most {MAX_USER_NAME_CHARS} characters")
    if "\x00" in user.name:
        raise InvalidInput("user.name", "must not contain NUL characters")
    _check_encodable("user.name", user.name)
    return user


def check_channel(workspace_id: object, channel_id: object) -> ChannelRef:
    return ChannelRef(check_id("workspaceId", workspace_id), check_id("channelId", channel_id))


def _check_encodable(field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(field, "must be valid Unicode (no lone surrogates)") from None
