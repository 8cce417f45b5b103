"""Unknown model names with a shared store: one store read per name per poll interval, bounded.

Fast tests of the negative cache and of the pull on miss on a folder and an S3 store (no
engine); tests/test_store_replicas.py proves it through HTTP on the real engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore, StoredManifest, VersionCache
from adapters.store.absent import AbsentNames
from adapters.store.protocol import ManifestEntry
from server.admin.adapter_service import AdapterService
from server.admin.store_sync import StoreSync

POLL_SECONDS = 30.0  # the test polls by hand


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_name_is_absent_for_the_ttl_then_asked_again() -> None:
    clock = Clock()
    absent = AbsentNames(ttl=2.0, clock=clock)
    assert "x" not in absent
    absent.add("x")
    clock.now = 1.9
    assert "x" in absent
    clock.now = 2.0
    assert "x" not in absent and len(absent) == 0  # expired entries go when looked up


def test_the_oldest_names_go_first_beyond_the_bound() -> None:
    absent = AbsentNames(ttl=60.0, max_names=3, clock=Clock())
    for name in ["a", "b", "c", "a", "d"]:  # "a" again: now the newest
        absent.add(name)
    assert len(absent) == 3
    assert [name in absent for name in "abcd"] == [True, False, True, True]
    absent.discard("c")
    assert "c" not in absent


class CountingStore:
    """An adapter store that counts its manifest reads."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.reads: list[str] = []

    def read_manifest(self, name: str) -> ManifestEntry | None:
        self.reads.append(name)
        return self.store.read_manifest(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class NoAdapters:
    """What StoreSync reads of the adapter service when nothing is served here."""

    def __init__(self) -> None:
        self.registry = AdapterRegistry("base")
        self.base_model_name = "base"


async def test_an_unknown_name_reads_the_store_once_until_the_watcher_sees_it(
    store: AdapterStore, tmp_path: Path
) -> None:
    counting = CountingStore(store)
    sync = StoreSync(
        cast(AdapterStore, counting),
        VersionCache(tmp_path / "cache", 2**20),
        cast(AdapterService, NoAdapters()),
        POLL_SECONDS,
    )
    assert sync.absent.ttl == POLL_SECONDS  # kept no longer than the watcher's own lag
    for _ in range(5):
        await sync.pull("ghost")
    await sync.pull("other")
    assert counting.reads == ["ghost", "other"]
    assert sync._pull_locks == {}  # no lock left behind per unknown name
    # Registered through another replica: this one's next poll forgets the absence at once.
    store.create_manifest(StoredManifest(name="ghost", version="d1", generation=1, rank=4))
    await sync.sync_once()
    assert "ghost" not in sync.absent and "other" in sync.absent
