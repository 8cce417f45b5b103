"""The adapter store as a folder on a shared volume (NFS, a Kubernetes ReadWriteMany claim).

A version is written into a temporary folder and renamed into place in one step: a reader sees
all of it or none. A manifest is created with `link` (fails if the name exists, like O_EXCL) and
replaced with `rename`; a replace or delete compares the token under an exclusive `flock` on
`manifests/.lock`, so two writers never both win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from adapters.durable import fsync_dir
from adapters.store.protocol import (
    ManifestConflict,
    ManifestEntry,
    StoredManifest,
    StoreError,
    version_files,
)

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".tmp-"


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


class FolderStore:
    """Versions and manifests under one folder, safe for writers on several hosts sharing it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        self._versions = root / "versions"
        self._manifests = root / "manifests"
        self._versions.mkdir(parents=True, exist_ok=True)
        self._manifests.mkdir(parents=True, exist_ok=True)

    # Versions

    def has_version(self, digest: str) -> bool:
        return (self._versions / digest).is_dir()

    def put_version(self, digest: str, folder: Path) -> None:
        if self.has_version(digest):
            return
        temp = self._versions / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            for source in version_files(folder):
                shutil.copyfile(source, temp / source.name)
                with open(temp / source.name, "rb+") as copied:
                    os.fsync(copied.fileno())
            fsync_dir(temp)
            try:
                os.rename(temp, self._versions / digest)
            except OSError as exc:
                # Another writer renamed the same version into place first: same bytes.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            fsync_dir(self._versions)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def fetch_version(self, digest: str, dest: Path) -> None:
        source = self._versions / digest
        if not source.is_dir():
            raise StoreError(f"version {digest[:12]} is not in the adapter store")
        for path in version_files(source):
            shutil.copyfile(path, dest / path.name)

    # Manifests

    def _path(self, name: str) -> Path:
        return self._manifests / f"{name}.json"

    def list_manifests(self) -> dict[str, str]:
        listed: dict[str, str] = {}
        for path in self._manifests.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                stat = path.stat()
                # A replace renames a new file in: the inode changes, so this token does.
                listed[path.name[: -len(".json")]] = f"{stat.st_ino}-{stat.st_mtime_ns}"
        return listed

    def read_manifest(self, name: str) -> ManifestEntry | None:
        try:
            data = self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        return ManifestEntry(StoredManifest.from_bytes(data), hashlib.sha256(data).hexdigest())

    def create_manifest(self, manifest: StoredManifest) -> str:
        data = manifest.to_bytes()
        temp = self._manifests / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        _write_durably(temp, data)
        try:
            os.link(temp, self._path(manifest.name))  # atomic, and fails if the name exists
        except FileExistsError:
            raise ManifestConflict(f"adapter `{manifest.name}` exists in the store") from None
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(self._manifests)
        return hashlib.sha256(data).hexdigest()

    def replace_manifest(self, manifest: StoredManifest, token: str) -> str:
        data = manifest.to_bytes()
        temp = self._manifests / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        _write_durably(temp, data)
        try:
            with self._exclusive():
                self._check_token(manifest.name, token)
                os.replace(temp, self._path(manifest.name))
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(self._manifests)
        return hashlib.sha256(data).hexdigest()

    def delete_manifest(self, name: str, token: str) -> None:
        with self._exclusive():
            self._check_token(name, token)
            self._path(name).unlink()
        fsync_dir(self._manifests)

    def _check_token(self, name: str, token: str) -> None:
        current = self.read_manifest(name)
        if current is None or current.token != token:
            raise ManifestConflict(f"adapter `{name}` changed in the store meanwhile")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with open(self._manifests / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
