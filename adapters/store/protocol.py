"""What every adapter store offers, the manifest it keeps per adapter, and how to open one.

Layout, the same on every store (keys under the store's prefix):
- `versions/<digest>/<file>`: the adapter's files, immutable; `<digest>` is `version_digest` of
  them, so two writers of one version write the same bytes and a reader can check what it got.
- `manifests/<name>.json`: the adapter's current version (a `StoredManifest`). A manifest is
  written only after its version is complete; replacing it is one conditional write; deleting it
  unloads the adapter everywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.errors import AdapterError

MANIFEST_FORMAT = 1
# Files a version may hold; a version holds the config and one weights file.
VERSION_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_CHUNK = 1 << 20


class StoreError(AdapterError):
    """The store could not be read or written (unreachable, refused, corrupt)."""


class ManifestConflict(AdapterError):
    """A conditional manifest write lost: another writer created or changed it first."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def version_files(folder: Path) -> list[Path]:
    """The files of `folder` that belong in a version, in a fixed order."""
    return [folder / name for name in VERSION_FILES if (folder / name).is_file()]


def version_digest(folder: Path) -> str:
    """The version's address: sha256 over each file's name and sha256, in a fixed order."""
    lines = "".join(f"{path.name}\0{file_sha256(path)}\n" for path in version_files(folder))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class StoredManifest:
    """The small per-adapter document naming the current version, with what loading it needs."""

    name: str
    version: str  # version_digest of the files under versions/<version>/
    generation: int  # 1 when created, +1 at every replace
    pinned: bool = False
    options: dict[str, bool] = field(default_factory=dict)  # allow_base_mismatch, ...
    source: str = ""  # where the client loaded it from (never a server path)
    weights_sha256: str = ""
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    updated_at: float = field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return json.dumps({"format_version": MANIFEST_FORMAT, **asdict(self)}, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredManifest:
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.pop("format_version", None) != MANIFEST_FORMAT:
                raise ValueError("unknown manifest format")
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"adapter manifest is corrupt: {exc}") from exc


@dataclass(frozen=True)
class ManifestEntry:
    """A manifest as read, with the token a conditional replace or delete must present."""

    manifest: StoredManifest
    token: str  # S3: the object's ETag; folder: sha256 of the file's bytes


class AdapterStore(Protocol):
    """A shared store of adapter versions and manifests. Blocking: call it from a thread."""

    url: str  # where it is, without credentials, for logs

    def has_version(self, digest: str) -> bool:
        """True when the version is complete in the store."""
        ...

    def put_version(self, digest: str, folder: Path) -> None:
        """Write `folder`'s files as version `digest`; a no-op if it is already complete."""
        ...

    def fetch_version(self, digest: str, dest: Path) -> None:
        """Write version `digest`'s files into the empty folder `dest`; StoreError if absent."""
        ...

    def list_manifests(self) -> dict[str, str]:
        """Every adapter name with a token that changes whenever its manifest changes."""
        ...

    def read_manifest(self, name: str) -> ManifestEntry | None:
        """The adapter's manifest, or None when it is not registered."""
        ...

    def create_manifest(self, manifest: StoredManifest) -> str:
        """Write a new manifest; ManifestConflict if one exists. Returns its token."""
        ...

    def replace_manifest(self, manifest: StoredManifest, token: str) -> str:
        """Replace the manifest whose token is `token`; ManifestConflict if it changed."""
        ...

    def delete_manifest(self, name: str, token: str) -> None:
        """Delete the manifest whose token is `token`; ManifestConflict if it changed."""
        ...


def open_store(location: str, endpoint_url: str | None = None) -> AdapterStore:
    """`s3://bucket/prefix` (credentials from the standard AWS variables) or a folder path."""
    if location.startswith("s3://"):
        from adapters.store.s3 import S3Store  # boto3 only when an S3 store is configured

        return S3Store.from_url(location, endpoint_url)
    from adapters.store.folder import FolderStore

    return FolderStore(Path(location))
