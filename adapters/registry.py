"""The registry of adapters: name -> record, int ids that are never reused, per-name locks."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from adapters.errors import AdapterNotFound, InvalidAdapter

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


@dataclass
class AdapterRecord:
    """One registered adapter version; `int_id` names this exact version in the engine."""

    name: str
    source: str  # where it came from, as the client named it (never an internal path)
    path: str  # the folder the engine loads
    sha256: str
    rank: int
    target_modules: list[str]
    int_id: int
    version: int = 1
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    last_used: float | None = None
    request_count: int = 0
    dropped_modules: list[str] = field(default_factory=list)  # tower part not served
    drop_reason: str | None = None  # adapters.validation.DropReason value
    # adapters.fingerprint of the served folder when it was last validated or hashed: a restart
    # trusts the validation (recorded here, keyed by sha256) while the fingerprint matches.
    fingerprint: list[int] | None = None
    served_sha256: str | None = None  # of the served copy's weights, when it is a copy
    probed: bool = True  # False: the effect probe is still due (at first use)
    # False: registered from the preload folder, validated at first use or in the background;
    # until then sha256, rank and target_modules are unknown ("", 0, []).
    validated: bool = True
    store_version: str | None = None  # the shared store's version digest; None: local only

    def to_json(self) -> dict[str, Any]:
        # A shallow copy (lists are replaced, never changed in place): `asdict` deep-copies
        # each field: 44 ms against 1 ms for 1000 records, at every registry save.
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterRecord:
        return cls(**data)


def check_name(name: str, base_model_name: str) -> None:
    """Refuse names that could not be a model id: slashes, the base name, too long."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidAdapter(f"adapter name must be 1 to {MAX_NAME_LENGTH} characters")
    if not _NAME.match(name):
        raise InvalidAdapter(
            "adapter name may hold only letters, digits and . _ : - (no slashes or spaces)"
        )
    if name == base_model_name:
        raise InvalidAdapter("adapter name must differ from the base model's name")


class AdapterRegistry:
    """Adapters that clients can name as `model`; changes go through one name's lock at a time."""

    def __init__(self, base_model_name: str, *, next_id: int = 1) -> None:
        self.base_model_name = base_model_name
        self._records: dict[str, AdapterRecord] = {}
        self._next_id = next_id
        self._locks: dict[str, asyncio.Lock] = {}
        self._sorted: list[AdapterRecord] | None = None  # by name; rebuilt after a change
        self.revision = 0  # counts changes of names or records, so readers can cache
        # Counts those and changes inside records too (use counts, validation), for readers
        # that show a record's fields (the admin list).
        self.detail_revision = 0

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[AdapterRecord]:
        return iter(self.by_name())

    def by_name(self) -> list[AdapterRecord]:
        """The records by name; sorted once per change, not once per read (1000s of adapters)."""
        if self._sorted is None:
            self._sorted = sorted(self._records.values(), key=lambda r: r.name)
        return self._sorted

    def _changed(self) -> None:
        self._sorted = None
        self.revision += 1
        self.detail_revision += 1

    def record_changed(self) -> None:
        """A registered record's fields were changed in place (not its name or engine id)."""
        self.detail_revision += 1

    def __contains__(self, name: object) -> bool:
        return name in self._records

    @property
    def next_id(self) -> int:
        return self._next_id

    def advance_ids(self, next_id: int) -> None:
        """Never hand out ids below `next_id` (ids used before a restart stay retired)."""
        self._next_id = max(self._next_id, next_id)

    def allocate_id(self) -> int:
        """A fresh engine id; ids are never reused, so a new version never meets stale caches."""
        allocated = self._next_id
        self._next_id += 1
        return allocated

    def get(self, name: str) -> AdapterRecord:
        """The record for `name`; AdapterNotFound if there is none."""
        try:
            return self._records[name]
        except KeyError:
            raise AdapterNotFound(f"adapter `{name}` does not exist") from None

    def find(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def put(self, record: AdapterRecord) -> AdapterRecord | None:
        """Make `record` the one behind its name at once; returns the record it replaced."""
        self._next_id = max(self._next_id, record.int_id + 1)
        previous = self._records.get(record.name)
        self._records[record.name] = record
        self._changed()
        return previous

    def remove(self, name: str) -> AdapterRecord:
        """Drop a name at once; AdapterNotFound if it is not registered."""
        record = self.get(name)
        del self._records[name]
        self._changed()
        return record

    def mark_used(self, name: str) -> None:
        record = self._records.get(name)
        if record is not None:
            record.last_used = time.time()
            record.request_count += 1
            self.detail_revision += 1

    @asynccontextmanager
    async def locked(self, name: str) -> Any:
        """Serialise operations on one name; different names proceed in parallel."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            yield
