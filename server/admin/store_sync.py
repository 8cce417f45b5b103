"""This replica kept in step with the shared adapter store, the source of truth for every replica.

- Writes: the admin API's loads and unloads go through to the store (`AdapterPublisher`): the
  version first, then the manifest in one conditional write, so two replicas never both win.
- Pull on miss: a request naming an adapter unknown here reads its manifest, pulls the version
  into the local cache (one pull per name at a time; other requests wait for it), validates and
  loads it. A name the store does not hold is remembered as absent for one poll interval
  (`adapters.store.absent`): requests for it meanwhile get their 404 without a store read.
- Watch: every `poll_seconds` the manifests are listed (one listing; only changed ones are
  read); an adapter served here whose manifest changed is switched to the new version, one whose
  manifest is gone is unloaded here. A request keeps the version it started on (leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path

from adapters.errors import AdapterError, AdapterExists, InvalidAdapter
from adapters.registry import AdapterRecord, check_name
from adapters.store import (
    AdapterStore,
    ManifestConflict,
    StoredManifest,
    StoreError,
    VersionCache,
    version_digest,
)
from adapters.store.absent import AbsentNames
from adapters.store.protocol import ManifestEntry
from server.admin.adapter_service import (
    AdapterLease,
    AdapterService,
    InstallOptions,
    LoadRequest,
)
from server.engine.protocol import EngineDeadError
from server.http.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

_OPTIONS = ("allow_base_mismatch", "drop_tower_weights")


def record_of(manifest: StoredManifest) -> AdapterRecord:
    """What the store says of an adapter not loaded here (no engine id: 0)."""
    return AdapterRecord(
        name=manifest.name,
        source=manifest.source,
        path="",
        sha256=manifest.weights_sha256,
        rank=manifest.rank,
        target_modules=list(manifest.target_modules),
        int_id=0,
        version=manifest.generation,
        pinned=manifest.pinned,
        loaded_at=manifest.updated_at,
        store_version=manifest.version,
    )


class StoreSync:
    """Pull on miss, write-through and the manifest watcher of one replica."""

    def __init__(
        self,
        store: AdapterStore,
        cache: VersionCache,
        adapters: AdapterService,
        poll_seconds: float,
    ) -> None:
        self.store = store
        self.cache = cache
        self.adapters = adapters
        self.poll_seconds = poll_seconds
        self._pull_locks: dict[str, asyncio.Lock] = {}
        self._pulling: set[str] = set()  # version digests being pulled: never evicted
        self._tokens: dict[str, str] = {}  # name -> listing token last read
        self._manifests: dict[str, StoredManifest] = {}  # the store as last seen
        # Not in the store when last asked; kept no longer than the watcher's own lag.
        self.absent = AbsentNames(ttl=poll_seconds)
        self.revision = 0  # counts changes of what was seen, so readers can cache listings
        self._watching: asyncio.Task[None] | None = None
        self.last_sync: float | None = None

    # What the store holds

    def manifests(self) -> list[StoredManifest]:
        """Every adapter registered in the store at the last poll, by name."""
        return sorted(self._manifests.values(), key=lambda m: m.name)

    # Requests

    async def resolve(self, model: str) -> AdapterLease:
        """The lease for a request's `model`, pulled from the store first if unknown here."""
        if model != self.adapters.base_model_name and model not in self.adapters.registry:
            try:
                check_name(model, self.adapters.base_model_name)
            except InvalidAdapter:
                return await self.adapters.acquire(model)  # not a name the store can hold: 404
            await self.pull(model)
        return await self.adapters.acquire(model)

    async def pull(self, name: str) -> None:
        """Serve `name` here if the store has it; concurrent callers wait for one pull."""
        if name in self.absent:
            return  # not in the store a moment ago: the caller answers 404
        lock = self._pull_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.adapters.registry or name in self.absent:
                return  # another request pulled it, or found it absent, while this one waited
            try:
                entry = await asyncio.to_thread(self.store.read_manifest, name)
            except StoreError as exc:
                raise ServiceUnavailable("the adapter store is unreachable; retry") from exc
            if entry is None:
                self.absent.add(name)
                if self._pull_locks.get(name) is lock:  # one lock per unknown name would pile up
                    del self._pull_locks[name]
                return  # not registered anywhere: the caller answers 404
            self._seen(entry)
            await self._install(entry.manifest)

    async def _install(self, manifest: StoredManifest) -> None:
        digest = manifest.version
        self._pulling.add(digest)
        try:
            started = time.perf_counter()
            folder = await asyncio.to_thread(
                self.cache.get, digest, functools.partial(self.store.fetch_version, digest)
            )
            options = InstallOptions(
                store_version=digest,
                version=manifest.generation,
                pin=manifest.pinned,
                **{key: bool(manifest.options.get(key)) for key in _OPTIONS},
            )
            await self.adapters.install(manifest.name, folder, manifest.source, options)
            logger.info(
                "adapter %s v%d pulled from the store in %.2f s",
                manifest.name,
                manifest.generation,
                time.perf_counter() - started,
            )
        except EngineDeadError:
            raise
        except (AdapterError, OSError) as exc:
            logger.error("adapter %s could not be pulled from the store: %s", manifest.name, exc)
            raise ServiceUnavailable(
                f"adapter `{manifest.name}` could not be loaded from the adapter store"
            ) from exc
        finally:
            self._pulling.discard(digest)
        await self._evict()

    async def _evict(self) -> None:
        in_use = {r.store_version for r in self.adapters.registry if r.store_version}
        await asyncio.to_thread(self.cache.evict, in_use | self._pulling)

    # Writes (AdapterPublisher)

    async def before_load(self, request: LoadRequest) -> object:
        try:
            entry = await asyncio.to_thread(self.store.read_manifest, request.name)
        except StoreError as exc:
            raise ServiceUnavailable("the adapter store is unreachable; retry") from exc
        if entry is not None and not request.replace:
            raise AdapterExists(
                f"adapter `{request.name}` exists; send replace=true to load a new version"
            )
        return entry

    async def publish(
        self, request: LoadRequest, folder: Path, record: AdapterRecord, token: object
    ) -> None:
        previous = token if isinstance(token, ManifestEntry) else None
        try:
            digest = await asyncio.to_thread(version_digest, folder)
            await asyncio.to_thread(self.store.put_version, digest, folder)
            manifest = StoredManifest(
                name=record.name,
                version=digest,
                generation=previous.manifest.generation + 1 if previous else 1,
                pinned=record.pinned,
                options={key: bool(getattr(request, key)) for key in _OPTIONS},
                source=record.source,
                weights_sha256=record.sha256,
                rank=record.rank,
                target_modules=list(record.target_modules),
            )
            if previous is None:
                entry_token = await asyncio.to_thread(self.store.create_manifest, manifest)
            else:
                entry_token = await asyncio.to_thread(
                    self.store.replace_manifest, manifest, previous.token
                )
        except ManifestConflict as exc:
            if previous is None:
                raise AdapterExists(
                    f"adapter `{record.name}` was registered by another replica meanwhile; "
                    "send replace=true to load a new version"
                ) from exc
            raise AdapterExists(
                f"adapter `{record.name}` was changed by another replica meanwhile; retry"
            ) from exc
        except StoreError as exc:
            raise ServiceUnavailable("the adapter store is unreachable; retry") from exc
        record.store_version = digest
        record.version = manifest.generation
        self._seen(ManifestEntry(manifest, entry_token))
        self._tokens.pop(record.name, None)  # the listing token differs from the write's

    async def withdraw(self, name: str) -> AdapterRecord | None:
        try:
            entry = await asyncio.to_thread(self.store.read_manifest, name)
            if entry is None:
                return None
            await asyncio.to_thread(self.store.delete_manifest, name, entry.token)
        except ManifestConflict as exc:
            raise AdapterExists(
                f"adapter `{name}` was changed by another replica meanwhile; retry"
            ) from exc
        except StoreError as exc:
            raise ServiceUnavailable("the adapter store is unreachable; retry") from exc
        self._manifests.pop(name, None)
        self._tokens.pop(name, None)
        self.revision += 1
        return record_of(entry.manifest)

    # Watching

    def _seen(self, entry: ManifestEntry) -> None:
        self._manifests[entry.manifest.name] = entry.manifest
        self.absent.discard(entry.manifest.name)
        self.revision += 1

    async def sync_once(self) -> None:
        """Read what changed in the store; switch or unload what this replica serves."""
        listed = await asyncio.to_thread(self.store.list_manifests)
        for name, token in listed.items():
            if self._tokens.get(name) == token:
                continue
            entry = await asyncio.to_thread(self.store.read_manifest, name)
            if entry is None:
                continue  # deleted since the listing
            self._seen(entry)
            self._tokens[name] = token
        for name in set(self._manifests) - set(listed):
            del self._manifests[name]
            self._tokens.pop(name, None)
            self.revision += 1
        for record in list(self.adapters.registry):
            manifest = self._manifests.get(record.name)
            if manifest is None:
                if record.store_version is not None:  # unloaded through another replica
                    await self.adapters.forget(record.name, record.store_version)
            elif (record.store_version, record.pinned) != (manifest.version, manifest.pinned):
                await self._switch(record, manifest)
        self.last_sync = time.time()

    async def _switch(self, record: AdapterRecord, manifest: StoredManifest) -> None:
        """Serve the store's version of `record.name`; if it cannot be, stop serving the old."""
        async with self._pull_locks.setdefault(record.name, asyncio.Lock()):
            try:
                await self._install(manifest)
            except ServiceUnavailable:
                # Never keep serving a version the store replaced: the next request pulls again.
                await self.adapters.forget(record.name, record.store_version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync_once()
            except EngineDeadError:
                continue  # the supervisor restarts the engine; the next poll catches up
            except (StoreError, OSError) as exc:
                logger.warning("adapter store poll failed: %s", exc)
            except Exception:  # the watcher must outlive any one bad poll
                logger.exception("adapter store poll failed")

    def start(self) -> None:
        self._watching = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
