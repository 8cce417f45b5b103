"""The shared adapter store against a real S3 server (SeaweedFS) and a folder; the local cache."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.store import (
    AdapterStore,
    ManifestConflict,
    StoredManifest,
    StoreError,
    VersionCache,
    version_digest,
)
from adapters.store.s3 import S3Store
from tests.s3_server import S3Server


def make_version(folder: Path, seed: bytes, size: int = 4096) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed.hex()}))
    (folder / "adapter_model.safetensors").write_bytes((seed * size)[:size])
    return folder


def manifest(name: str, digest: str, generation: int = 1) -> StoredManifest:
    return StoredManifest(name=name, version=digest, generation=generation, rank=8)


def test_a_version_round_trips_and_is_checked_by_its_digest(
    store: AdapterStore, tmp_path: Path
) -> None:
    folder = make_version(tmp_path / "a", b"a")
    digest = version_digest(folder)
    assert not store.has_version(digest)
    store.put_version(digest, folder)
    store.put_version(digest, folder)  # a second writer of the same version is a no-op
    assert store.has_version(digest)
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    store.fetch_version(digest, pulled)
    assert version_digest(pulled) == digest
    assert sorted(p.name for p in pulled.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with pytest.raises(StoreError):
        store.fetch_version("0" * 64, tmp_path)


def test_manifest_create_is_exclusive_and_replace_needs_the_current_token(
    store: AdapterStore, tmp_path: Path
) -> None:
    assert store.read_manifest("x") is None
    token = store.create_manifest(manifest("x", "d1"))
    with pytest.raises(ManifestConflict):
        store.create_manifest(manifest("x", "d2"))
    entry = store.read_manifest("x")
    assert entry is not None and entry.manifest.version == "d1" and entry.token == token
    new_token = store.replace_manifest(manifest("x", "d2", 2), token)
    with pytest.raises(ManifestConflict):  # the token of the version replaced is stale now
        store.replace_manifest(manifest("x", "d3", 3), token)
    with pytest.raises(ManifestConflict):
        store.delete_manifest("x", token)
    entry = store.read_manifest("x")
    assert entry is not None and (entry.manifest.version, entry.manifest.generation) == ("d2", 2)
    assert set(store.list_manifests()) == {"x"}
    store.delete_manifest("x", new_token)
    assert store.read_manifest("x") is None
    assert store.list_manifests() == {}


def test_list_tokens_change_when_a_manifest_changes(store: AdapterStore) -> None:
    token = store.create_manifest(manifest("a", "d1"))
    store.create_manifest(manifest("b", "d1"))
    before = store.list_manifests()
    store.replace_manifest(manifest("a", "d2", 2), token)
    after = store.list_manifests()
    assert after["a"] != before["a"]
    assert after["b"] == before["b"]


def race(writers: int, write: Callable[[int], object]) -> list[bool]:
    """`write(i)` in `writers` threads released at once: which of them met no conflict."""
    barrier = threading.Barrier(writers)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            write(i)
            return True
        except ManifestConflict:
            return False

    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(attempt, range(writers)))


def test_concurrent_creates_and_replaces_have_exactly_one_winner(store: AdapterStore) -> None:
    created = race(8, lambda i: store.create_manifest(manifest("race", f"d{i}")))
    assert created.count(True) == 1
    entry = store.read_manifest("race")
    assert entry is not None and entry.manifest.version == f"d{created.index(True)}"
    token = entry.token
    replaced = race(8, lambda i: store.replace_manifest(manifest("race", f"r{i}", 2), token))
    assert replaced.count(True) == 1
    final = store.read_manifest("race")
    assert final is not None and final.manifest.version == f"r{replaced.index(True)}"


def test_concurrent_writers_of_one_version_leave_it_whole(
    store: AdapterStore, tmp_path: Path
) -> None:
    folder = make_version(tmp_path / "v", b"v", size=1 << 20)
    digest = version_digest(folder)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: store.put_version(digest, folder), range(4)))
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    store.fetch_version(digest, pulled)
    assert version_digest(pulled) == digest


def test_s3_store_reads_credentials_from_the_standard_variables(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bucket = s3_server.new_bucket()
    wrong = S3Store.from_url(f"s3://{bucket}", s3_server.endpoint_url)
    with pytest.raises(StoreError):
        wrong.list_manifests()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert S3Store.from_url(f"s3://{bucket}", s3_server.endpoint_url).list_manifests() == {}


def test_cache_evicts_least_recently_used_by_bytes_never_in_use(tmp_path: Path) -> None:
    sources = {i: make_version(tmp_path / f"src{i}", bytes([65 + i]), size=1000) for i in range(4)}
    digests = {i: version_digest(folder) for i, folder in sources.items()}
    cache = VersionCache(tmp_path / "cache", max_bytes=3200)  # three versions of ~1030 bytes fit
    for i in range(3):
        cache.add(digests[i], sources[i])
    cache.get(digests[0], lambda _: pytest.fail("a cached version is not pulled again"))
    # 1 is now least recently used; 2 is in use: 1 goes first.
    cache.add(digests[3], sources[3])
    assert cache.evict(in_use={digests[2]}) == [digests[1]]
    assert digests[1] not in cache and not cache.path(digests[1]).exists()
    assert cache.total_bytes <= 3200
    # Everything in use: nothing can go, however far over the bound.
    everything = {digests[0], digests[2], digests[3]}
    cache.max_bytes = 0
    assert cache.evict(in_use=everything) == []
    assert cache.evict(in_use={digests[0]}) == [digests[2], digests[3]]
    # A new process finds what is on disk.
    assert digests[0] in VersionCache(tmp_path / "cache", max_bytes=10**9)


def test_cache_refuses_a_pull_that_does_not_match_its_digest(tmp_path: Path) -> None:
    folder = make_version(tmp_path / "src", b"s")
    cache = VersionCache(tmp_path / "cache", max_bytes=10**9)

    def tampered(dest: Path) -> None:
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        (dest / "adapter_model.safetensors").write_bytes(b"changed")

    with pytest.raises(StoreError):
        cache.get(version_digest(folder), tampered)
    assert list((tmp_path / "cache").iterdir()) == []
