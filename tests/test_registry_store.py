"""Unit tests of adapters.persistence: round trip, atomic writes, corrupt and newer files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from adapters import persistence
from adapters.persistence import FORMAT_VERSION, RegistryStateError, RegistryStore
from adapters.registry import AdapterRecord, AdapterRegistry


def _record(name: str, int_id: int, **changes: object) -> AdapterRecord:
    values: dict[str, object] = {
        "name": name,
        "source": f"upload:{name}",
        "path": f"/state/adapters/{name}-abc",
        "sha256": "0" * 64,
        "rank": 8,
        "target_modules": ["q_proj", "v_proj"],
        "int_id": int_id,
        "loaded_at": 1700000000.0,
    }
    values.update(changes)
    return AdapterRecord(**values)  # type: ignore[arg-type]


def test_missing_file_is_an_empty_registry(tmp_path: Path) -> None:
    assert RegistryStore(tmp_path / "state").load() == ([], 1)


def test_round_trip(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "state")  # created on first save
    records = [
        _record("alpha", 1),
        _record("beta", 4, version=3, pinned=True, last_used=1700000100.5, request_count=7),
    ]
    store.save(records, next_id=5)
    assert store.load() == (records, 5)
    assert RegistryStore(tmp_path / "state").load() == (records, 5)  # a fresh process


def test_file_has_a_format_version(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("alpha", 1)], next_id=2)
    document = json.loads((tmp_path / "registry.json").read_text())
    assert document["format_version"] == FORMAT_VERSION == 1
    assert document["next_id"] == 2
    assert [a["name"] for a in document["adapters"]] == ["alpha"]


def test_ids_are_never_reused_across_restarts(tmp_path: Path) -> None:
    registry = AdapterRegistry("base")
    for name in ["a", "b", "c"]:
        registry.put(_record(name, registry.allocate_id()))
    registry.remove("c")  # its id 3 must not come back after a restart
    store = RegistryStore(tmp_path)
    store.save(list(registry), registry.next_id)

    records, next_id = store.load()
    restarted = AdapterRegistry("base", next_id=next_id)
    for record in records:
        restarted.put(record)
    assert restarted.allocate_id() == 4


def test_next_id_never_falls_behind_the_saved_ids(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("a", 9)], next_id=2)
    assert store.load()[1] == 10


def test_failed_replace_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("old", 1)], next_id=2)
    before = (tmp_path / "registry.json").read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(persistence.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save([_record("new", 2)], next_id=3)
    monkeypatch.undo()

    assert (tmp_path / "registry.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]
    assert store.load() == ([_record("old", 1)], 2)


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("old", 1)], next_id=2)

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(persistence.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save([_record("new", 2)], next_id=3)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]
    assert store.load() == ([_record("old", 1)], 2)


def test_unserialisable_records_leave_the_old_file(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("old", 1)], next_id=2)
    with pytest.raises(TypeError):
        store.save([_record("new", 2, target_modules={object()})], next_id=3)
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]
    assert store.load() == ([_record("old", 1)], 2)


def test_temp_file_left_by_a_crash_is_removed_on_load(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path)
    store.save([_record("a", 1)], next_id=2)
    (tmp_path / ".registry.json.x1y2.tmp").write_text('{"half": ')
    assert store.load() == ([_record("a", 1)], 2)
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]


CORRUPT = [
    '{"format_version": 1, "next_id": 3, "adapters": [',
    "",
    "[]",
    '{"format_version": 1, "adapters": []}',
    '{"format_version": 1, "next_id": "3", "adapters": []}',
    '{"format_version": 1, "next_id": 3, "adapters": [{"name": "a"}]}',
    '{"format_version": 1, "next_id": 3, "adapters": [{"name": "a", "surprise": 1}]}',
    '{"next_id": 3, "adapters": []}',
]


@pytest.mark.parametrize("text", CORRUPT)
def test_corrupt_file_stops_start_up_and_is_left_in_place(tmp_path: Path, text: str) -> None:
    (tmp_path / "registry.json").write_text(text)
    with pytest.raises(RegistryStateError, match="corrupt"):
        RegistryStore(tmp_path).load()
    assert (tmp_path / "registry.json").read_text() == text  # nothing lost, nothing moved


@pytest.mark.parametrize("text", CORRUPT[:2])
def test_corrupt_file_can_be_moved_aside_to_start_empty(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "registry.json").write_text(text)
    with caplog.at_level(logging.ERROR, logger="adapters.persistence"):
        assert RegistryStore(tmp_path, reset_if_corrupt=True).load() == ([], 1)
    aside = list(tmp_path.glob("registry.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == text
    assert not (tmp_path / "registry.json").exists()
    assert "corrupt" in caplog.text and aside[0].name in caplog.text


def test_newer_format_always_stops_start_up(tmp_path: Path) -> None:
    text = json.dumps({"format_version": FORMAT_VERSION + 1, "next_id": 3, "adapters": []})
    (tmp_path / "registry.json").write_text(text)
    for reset in [False, True]:
        with pytest.raises(RegistryStateError, match="newer"):
            RegistryStore(tmp_path, reset_if_corrupt=reset).load()
    assert os.listdir(tmp_path) == ["registry.json"]
