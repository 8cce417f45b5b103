"""The registry on disk: one `registry.json`, replaced atomically so a crash never leaves half.

A corrupt file stops start-up (RegistryStateError) rather than starting empty: a server that
comes up with no adapters 404s every client that names one, and its first save would overwrite
the only record of what was registered. The operator decides: fix or restore the file, or move
it aside to start empty. `RegistryStore(..., reset_if_corrupt=True)` makes that second choice
automatic: the file is kept as `registry.json.corrupt-<timestamp>` and an error is logged.
A file from a newer format version is never moved aside; it always stops start-up.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.durable import fsync_dir
from adapters.registry import AdapterRecord

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REGISTRY_FILE = "registry.json"
_TEMP_PREFIX = f".{REGISTRY_FILE}."
_TEMP_SUFFIX = ".tmp"


class RegistryStateError(Exception):
    """The saved registry cannot be used; start-up should stop rather than lose it."""


def _parse(data: dict[str, Any]) -> tuple[list[AdapterRecord], int]:
    """Records and next id from the file's document; ValueError/TypeError/KeyError if malformed."""
    next_id = data["next_id"]
    if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id < 1:
        raise ValueError("next_id is not a positive integer")
    raw_records = data["adapters"]
    if not isinstance(raw_records, list):
        raise ValueError("adapters is not a list")
    records: list[AdapterRecord] = []
    names: set[str] = set()
    for raw in raw_records:
        if not isinstance(raw, dict):
            raise ValueError("an adapter entry is not an object")
        record = AdapterRecord.from_json(raw)
        if not isinstance(record.int_id, int) or record.name in names:
            raise ValueError(f"adapter entry {record.name!r} has a bad id or a duplicate name")
        names.add(record.name)
        records.append(record)
    # Ids are never reused, even if the saved counter somehow fell behind the saved ids.
    next_id = max([next_id, *(r.int_id + 1 for r in records)])
    return records, next_id


class RegistryStore:
    """Saves and loads the adapter registry as `<state_dir>/registry.json`."""

    def __init__(self, state_dir: Path, *, reset_if_corrupt: bool = False) -> None:
        self.state_dir = state_dir
        self.path = state_dir / REGISTRY_FILE
        self.reset_if_corrupt = reset_if_corrupt

    def save(self, records: list[AdapterRecord], next_id: int) -> None:
        """Replace registry.json atomically: the old version survives any failure mid-write."""
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "next_id": next_id,
            "adapters": [record.to_json() for record in records],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(
            prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.state_dir
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp_name, self.path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        # The rename itself is durable only once the folder's entry is on disk.
        fsync_dir(self.state_dir)

    def load(self) -> tuple[list[AdapterRecord], int]:
        """The saved records and next id; ([], 1) if nothing was saved yet.

        Raises RegistryStateError if the file was written by a newer format, and also if it is
        corrupt unless `reset_if_corrupt` (then it is moved aside, logged, and ([], 1) returned).
        """
        self._remove_stale_temp_files()
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], 1
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
            version = data.get("format_version")
            if isinstance(version, int) and version > FORMAT_VERSION:
                # Not corrupt, just newer: never move it aside, whatever `reset_if_corrupt` says.
                raise RegistryStateError(
                    f"{self.path} has format version {version}, newer than this server's "
                    f"{FORMAT_VERSION}; run a newer server or restore an older file"
                )
            if version != FORMAT_VERSION:
                raise ValueError(f"unknown format version {version!r}")
            return _parse(data)
        except (ValueError, TypeError, KeyError) as exc:
            return self._handle_corrupt(exc)

    def _handle_corrupt(self, error: Exception) -> tuple[list[AdapterRecord], int]:
        if not self.reset_if_corrupt:
            raise RegistryStateError(
                f"{self.path} is corrupt ({error}); fix or restore it, or move it aside to start "
                "with an empty registry"
            ) from error
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        aside = self.path.with_name(f"{REGISTRY_FILE}.corrupt-{stamp}")
        os.replace(self.path, aside)
        fsync_dir(self.state_dir)
        logger.error(
            "adapter registry %s is corrupt (%s); moved it to %s and starting with no adapters",
            self.path,
            error,
            aside,
        )
        return [], 1

    def _remove_stale_temp_files(self) -> None:
        """Temporary files a crash left between write and rename; never the real file."""
        if not self.state_dir.is_dir():
            return
        for entry in self.state_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            logger.warning("removing unfinished registry write %s", entry)
            entry.unlink(missing_ok=True)
