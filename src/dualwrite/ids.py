"""Message ids in Firebase's push-id format.

Twenty characters: eight encode the millisecond time, twelve are random. When two ids share a
millisecond the random part is incremented instead of redrawn, so the ids one generator makes
sort in creation order (by plain string comparison, as Firebase orders keys).
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable

PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
ID_LENGTH = 20
_TIME_CHARS = 8
_RANDOM_CHARS = 12
_BASE = len(PUSH_CHARS)


class PushIdGenerator:
    """Makes push ids; safe to share between threads and tasks."""

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = bytearray(_RANDOM_CHARS)
        """The random part as digits (0-63)."""

    def new_id(self) -> str:
        """Return a fresh id, greater than every id this generator returned before."""
        with self._lock:
            now = self._now_ms()
            # A clock that steps back must not break the ordering promise.
            if now <= self._last_ms:
                now = self._last_ms
                self._increment_random()
            else:
                # 256 is a multiple of 64, so each byte modulo 64 is a uniform digit.
                self._last_random = bytearray(secrets.token_bytes(_RANDOM_CHARS).translate(_DIGIT))
            self._last_ms = now
            return time_prefix(now) + self._last_random.translate(_CHAR).decode("ascii")

    def _increment_random(self) -> None:
        for position in range(_RANDOM_CHARS - 1, -1, -1):
            if self._last_random[position] != _BASE - 1:
                self._last_random[position] += 1
                return
            self._last_random[position] = 0
        # All twelve digits overflowed (2**72 ids in one millisecond): move time forward.
        self._last_ms += 1


_DIGIT = bytes(b % _BASE for b in range(256))
"""A byte to a digit (0-63)."""
_CHAR = bytes(ord(PUSH_CHARS[b % _BASE]) for b in range(256))
"""A digit (0-63) to its character."""


@functools.lru_cache(maxsize=1024)
def time_prefix(ms: int) -> str:
    """The eight leading characters of every push id made in millisecond ``ms`` (the same
    millisecond comes up again and again under load: remembered)."""
    chars = []
    for _ in range(_TIME_CHARS):
        chars.append(PUSH_CHARS[ms % _BASE])
        ms //= _BASE
    return "".join(reversed(chars))


def timestamp_of(push_id: str) -> int:
    """The millisecond time encoded in the first eight characters of a push id."""
    ms = 0
    for char in push_id[:_TIME_CHARS]:
        ms = ms * _BASE + PUSH_CHARS.index(char)
    return ms
