"""Unit tests of what keeps thousands of adapters cheap: fingerprints, the sorted registry,
the registry file's new fields, and the bound on vLLM's per-adapter-set metric series."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from adapters.fingerprint import folder_fingerprint
from adapters.persistence import RegistryStore
from adapters.registry import AdapterRecord, AdapterRegistry
from server.metrics import LORA_REQUESTS_INFO, keep_latest_lora_info


def record(name: str, int_id: int, **fields: object) -> AdapterRecord:
    return AdapterRecord(
        name=name,
        source=name,
        path=f"/adapters/{name}",
        sha256="0" * 64,
        rank=8,
        target_modules=["q_proj"],
        int_id=int_id,
        **fields,  # type: ignore[arg-type]
    )


def test_fingerprint_changes_with_the_files(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    assert folder_fingerprint(tmp_path) is None  # no weights file
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"a" * 10)
    first = folder_fingerprint(tmp_path)
    assert first is not None and folder_fingerprint(tmp_path) == first
    os.utime(weights, ns=(1, 1))
    touched = folder_fingerprint(tmp_path)
    assert touched != first
    replacement = tmp_path / "new"
    replacement.write_bytes(b"b" * 10)
    os.utime(replacement, ns=(1, 1))
    os.replace(replacement, weights)  # same size and times, another file
    assert folder_fingerprint(tmp_path) != touched
    (tmp_path / "adapter_config.json").unlink()
    assert folder_fingerprint(tmp_path) is None


def test_registry_sorts_once_per_change() -> None:
    registry = AdapterRegistry("base")
    for i in (3, 1, 2):
        registry.put(record(f"a{i}", i))
    names = [r.name for r in registry]
    assert names == ["a1", "a2", "a3"]
    assert registry.by_name() is registry.by_name()  # cached between changes
    revision = registry.revision
    iterating = iter(registry)
    registry.remove("a2")  # a reader's iteration is not disturbed by a change
    assert [r.name for r in iterating] == ["a1", "a2", "a3"]
    assert registry.revision == revision + 1
    assert [r.name for r in registry] == ["a1", "a3"]
    registry.mark_used("a1")
    assert registry.revision == revision + 1  # uses change no listing


def test_registry_file_keeps_the_new_fields_and_reads_old_ones(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path)
    fresh = record("fresh", 1, fingerprint=[1, 2, 3, 4, 5, 6], probed=False, validated=False)
    store.save([fresh], 2)
    (loaded,), _ = store.load()
    assert loaded == fresh
    document = json.loads(store.path.read_text())
    for key in ("fingerprint", "served_sha256", "probed", "validated"):
        del document["adapters"][0][key]  # as a server before them wrote it
    store.path.write_text(json.dumps(document))
    (old,), _ = store.load()
    assert (old.fingerprint, old.probed, old.validated) == (None, True, True)


def test_only_the_latest_lora_info_series_is_kept() -> None:
    registry = CollectorRegistry()
    gauge = Gauge(
        LORA_REQUESTS_INFO,
        "Running stats on lora requests.",
        ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        registry=registry,
    )
    for i in range(50):  # vLLM: one series per distinct set, the value its update time
        gauge.labels("4", f"a{i}", f"b{i},c{i}").set(1000 + i)
    keep_latest_lora_info(registry)
    (family,) = [f for f in registry.collect() if f.name == LORA_REQUESTS_INFO]
    assert [(s.labels["running_lora_adapters"], s.value) for s in family.samples] == [
        ("b49,c49", 1049)
    ]
    keep_latest_lora_info(CollectorRegistry())  # no such metric: nothing to do
