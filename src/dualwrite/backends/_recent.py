from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """Remembers the last ``capacity`` ids seen, so a live stream can drop repeats cheaply."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first_time(self, message_id: str) -> bool:
        """True the first time an id is offered (within the window), False on repeats."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True
