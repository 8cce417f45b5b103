"""The shared adapter store: immutable versions by sha256, one small manifest per adapter."""

from adapters.store.cache import VersionCache
from adapters.store.protocol import (
    AdapterStore,
    ManifestConflict,
    StoredManifest,
    StoreError,
    open_store,
    version_digest,
)

__all__ = [
    "AdapterStore",
    "ManifestConflict",
    "StoreError",
    "StoredManifest",
    "VersionCache",
    "open_store",
    "version_digest",
]
