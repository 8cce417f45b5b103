"""The host-cache model counts misses as an LRU with pins would."""

from adapters.residency import HostCacheModel


def test_lru_misses_and_pins() -> None:
    cache = HostCacheModel(capacity=2)
    assert cache.touch(1) and cache.touch(2)
    assert not cache.touch(1)  # hit; 2 is now least recently used
    assert cache.touch(3)  # evicts 2
    assert 2 not in cache and 1 in cache and 3 in cache
    cache.pin(3)
    cache.touch(4)  # evicts 1, never the pinned 3
    cache.touch(5)  # evicts 4
    assert 3 in cache and 5 in cache and 1 not in cache and 4 not in cache
    cache.drop(3)
    assert 3 not in cache
