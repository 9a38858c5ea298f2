"""Message ids in Firebase's push-id format.

Twenty characters: eight encode the millisecond time, twelve are random. When two ids share a
millisecond the random part is incremented instead of redrawn, so the ids one generator makes
sort in creation order (by plain string comparison, as Firebase orders keys).
"""

from __future__ import annotations

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
        self._last_random = [0] * _RANDOM_CHARS

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
                self._last_random = [b % _BASE for b in secrets.token_bytes(_RANDOM_CHARS)]
            self._last_ms = now
            return time_prefix(now) + "".join(PUSH_CHARS[i] for i in self._last_random)

    def _increment_random(self) -> None:
        for position in range(_RANDOM_CHARS - 1, -1, -1):
            if self._last_random[position] != _BASE - 1:
                self._last_random[position] += 1
                return
            self._last_random[position] = 0
        # All twelve digits overflowed (2**72 ids in one millisecond): move time forward.
        self._last_ms += 1


def time_prefix(ms: int) -> str:
    """The eight leading characters of every push id made in millisecond ``ms``."""
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
