"""The poison-request guard: a request that crashed the engine twice in a row is refused.

Without it, a client that retries a request which kills the engine keeps the service down: every
retry crashes the new engine. A request is known by a fingerprint of what reaches the engine (the
rendered prompt, its image and audio bytes, the adapter version and the sampling parameters), so
the same request sent again, by any client, is recognised. Only fingerprints are kept, in a small
LRU, never the requests themselves.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from server.engine.protocol import AdapterRef, Prompt, Sampling

CRASHES_TO_REFUSE = 2
GUARD_CAPACITY = 256  # fingerprints remembered; the least recently blamed go first


def request_fingerprint(prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None) -> str:
    """A digest of everything about a request that the engine sees."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prompt.text.encode())
    for image in prompt.images:
        digest.update(f"|image {image.mode} {image.size}|".encode())
        digest.update(image.tobytes())
    for audio in prompt.audios:
        digest.update(f"|audio {audio.dtype} {audio.shape}|".encode())
        digest.update(np.ascontiguousarray(audio).tobytes())
    digest.update(f"|adapter {adapter.name}@{adapter.int_id}|".encode() if adapter else b"|base|")
    digest.update(repr(sampling).encode())
    return digest.hexdigest()


class CrashGuard:
    """Per fingerprint, the engine deaths a request was suspected of since it last succeeded."""

    def __init__(
        self, capacity: int = GUARD_CAPACITY, crashes_to_refuse: int = CRASHES_TO_REFUSE
    ) -> None:
        self._capacity = capacity
        self._crashes_to_refuse = crashes_to_refuse
        self._crashes: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._crashes)

    def blame(self, fingerprint: str) -> None:
        """The engine died while this request was a suspect."""
        self._crashes[fingerprint] = self._crashes.get(fingerprint, 0) + 1
        self._crashes.move_to_end(fingerprint)
        while len(self._crashes) > self._capacity:
            self._crashes.popitem(last=False)

    def acquit(self, fingerprint: str) -> None:
        """The request ran to its end: whatever killed the engine, it was not this."""
        self._crashes.pop(fingerprint, None)

    def refuses(self, fingerprint: str) -> bool:
        return self._crashes.get(fingerprint, 0) >= self._crashes_to_refuse
