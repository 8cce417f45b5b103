"""Names the shared store was found not to hold, remembered briefly (a negative cache).

Without it every request naming an unknown model reads the store (an S3 GET): a client that
retries a mistyped name, or many of them, costs one store read per request. A name is kept for
at most `ttl` seconds and at most `max_names` names (the oldest go first, so random names cannot
grow it); a name the store is seen to hold again is dropped at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_NAMES = 4096


class AbsentNames:
    """A bounded, short-lived set of names the store did not hold when last asked."""

    def __init__(
        self,
        ttl: float,
        max_names: int = MAX_NAMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_names = max_names
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, name: object) -> bool:
        """True while `name` was found absent less than `ttl` seconds ago."""
        if not isinstance(name, str):
            return False
        expiry = self._expiry.get(name)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[name]
            return False
        return True

    def add(self, name: str) -> None:
        """The store did not hold `name` just now."""
        self._expiry.pop(name, None)
        self._expiry[name] = self._clock() + self.ttl
        while len(self._expiry) > self.max_names:
            self._expiry.popitem(last=False)

    def discard(self, name: str) -> None:
        """The store holds `name` (seen by the watcher or written here): forget its absence."""
        self._expiry.pop(name, None)
