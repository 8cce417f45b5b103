"""Stored responses, for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`.

Bounded and in memory: the least recently used response is dropped when the store is full. It
belongs to one process (one replica) and is lost on restart; a client that needs more keeps
its own history and sends it as `input`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from openai.types.responses import Response

from server.inference.protocol import ChatMessage


@dataclass(frozen=True)
class StoredResponse:
    response: Response
    # The conversation up to and including this response (without `instructions`, which
    # OpenAI does not carry over to the next response).
    conversation: list[ChatMessage]


class ResponseStore:
    """At most `capacity` responses, least recently used dropped first (0: none kept)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._entries[stored.response.id] = stored
        self._entries.move_to_end(stored.response.id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
