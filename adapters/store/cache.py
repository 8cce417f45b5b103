"""The local disk cache of versions pulled from the store: bounded in bytes, least recently used
first out, never a version in use (registered here, pinned, or being pulled)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from adapters.durable import fsync_dir
from adapters.store.protocol import StoreError, version_digest, version_files

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".pull-"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


class VersionCache:
    """`root/<digest>/` folders, each a complete, checked version. Thread-safe."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._used: dict[str, float] = {}  # digest -> last use, for LRU
        root.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            if entry.name.startswith(_TEMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)  # a pull cut by a crash
            elif entry.is_dir():
                self._sizes[entry.name] = _folder_bytes(entry)
                self._used[entry.name] = entry.stat().st_mtime

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._sizes

    def path(self, digest: str) -> Path:
        return self.root / digest

    def get(self, digest: str, fetch: Callable[[Path], None]) -> Path:
        """The cached folder of `digest`; pulled with `fetch(empty_folder)` if missing.

        The pulled files must hash to `digest` (StoreError otherwise), and appear in the cache
        in one rename, so a crash never leaves a half version under a digest.
        """
        with self._lock:
            if digest in self._sizes:
                self._used[digest] = time.time()
                return self.path(digest)
        temp = self.root / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            fetch(temp)
            got = version_digest(temp)
            if got != digest:
                raise StoreError(f"version {digest[:12]} in the store does not match its digest")
            for path in temp.iterdir():
                with open(path, "rb+") as pulled:
                    os.fsync(pulled.fileno())
            try:
                os.rename(temp, self.path(digest))
            except OSError:
                if not self.path(digest).is_dir():  # else pulled by another thread meanwhile
                    raise
            fsync_dir(self.root)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        with self._lock:
            self._sizes[digest] = _folder_bytes(self.path(digest))
            self._used[digest] = time.time()
        return self.path(digest)

    def add(self, digest: str, folder: Path) -> Path:
        """Copy a version this replica wrote to the store into the cache (no pull needed)."""
        return self.get(digest, lambda dest: _copy_files(folder, dest))

    def evict(self, in_use: set[str]) -> list[str]:
        """Drop least recently used versions not in `in_use` until the cache fits its bound."""
        dropped: list[str] = []
        with self._lock:
            total = sum(self._sizes.values())
            for digest in sorted(self._used, key=self._used.__getitem__):
                if total <= self.max_bytes:
                    break
                if digest in in_use:
                    continue
                total -= self._sizes.pop(digest)
                del self._used[digest]
                dropped.append(digest)
        for digest in dropped:
            shutil.rmtree(self.path(digest), ignore_errors=True)
            logger.info("adapter cache: evicted version %s", digest[:12])
        return dropped


def _copy_files(source: Path, dest: Path) -> None:
    for path in version_files(source):
        shutil.copyfile(path, dest / path.name)
