"""A model of which adapter versions the engine holds in host memory, to count cache misses.

It mirrors the engine's least-recently-used host cache (`max_cpu_loras` entries, pinned ones
never evicted) without asking the engine on every request, which would cost a round trip.
"""

from __future__ import annotations

from collections import OrderedDict


class HostCacheModel:
    """LRU over adapter ids with pins; `touch` tells whether an id had to be loaded again."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()

    def __contains__(self, int_id: object) -> bool:
        return int_id in self._ids

    def touch(self, int_id: int) -> bool:
        """Record a use of `int_id`; True if it was not resident (a load from disk)."""
        missed = int_id not in self._ids
        self._ids[int_id] = None
        self._ids.move_to_end(int_id)
        self._evict()
        return missed

    def pin(self, int_id: int) -> None:
        self._pinned.add(int_id)
        self.touch(int_id)

    def drop(self, int_id: int) -> None:
        self._ids.pop(int_id, None)
        self._pinned.discard(int_id)

    def _evict(self) -> None:
        for candidate in list(self._ids):
            if len(self._ids) <= self.capacity:
                return
            if candidate not in self._pinned:
                del self._ids[candidate]
