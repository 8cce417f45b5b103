"""The workers' LoRA residency, asked of the engine only when it may have changed.

Reading it is an RPC to every engine worker (`lora_residency.py`), and under load the engine
core answers it only between two steps: `/metrics` would pay that on every scrape. The workers'
LoRA caches change only when an adapter is added, removed or pinned, or when a request on an
adapter is scheduled; the supervisor reports those events here, so:

- with no event since the last answer, the cached answer is the engine's state: no RPC;
- after an add, remove or pin (a load, an unload, a first use) the next read asks the engine;
- while requests on adapters run (their scheduling moves adapters between slots and the host
  cache), the answer may be up to `MAX_AGE_SECONDS` old: at most one RPC per that interval.
  Once the last of them has ended, the next read asks the engine again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from server.engine.protocol import ResidentAdapter

MAX_AGE_SECONDS = 1.0


class ResidencyCache:
    """The last residency answer and whether an event since then requires asking again."""

    def __init__(
        self, max_age: float = MAX_AGE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_age = max_age
        self._clock = clock
        self._value: list[ResidentAdapter] | None = None
        self._events = 0  # events that may have changed the residency, counted
        self._asked_at_event = -1  # `_events` when the cached answer was asked for
        self._must_ask_after = 0  # an add/remove/pin at this count: older answers are void
        self._asked_at = 0.0
        self._running = 0  # requests on adapters in the engine now

    def invalidate(self) -> None:
        """An adapter was added, removed or pinned, or the engine replaced: ask at next read."""
        self._events += 1
        self._must_ask_after = self._events

    def request_started(self) -> None:
        self._events += 1
        self._running += 1

    def request_ended(self) -> None:
        self._events += 1
        self._running -= 1

    async def get(
        self, ask: Callable[[], Awaitable[list[ResidentAdapter]]]
    ) -> list[ResidentAdapter]:
        """The cached answer if still true (or young enough while requests run), else `ask()`."""
        if self._value is not None and self._asked_at_event >= self._must_ask_after:
            if self._asked_at_event == self._events:
                return self._value
            if self._running and self._clock() - self._asked_at < self._max_age:
                return self._value
        events, asked_at = self._events, self._clock()
        value = await ask()  # events during the call leave the answer marked as possibly old
        self._value, self._asked_at_event, self._asked_at = value, events, asked_at
        return value
