"""Adapters as the service runs them: validated, loaded in the engine, switched, retired, persisted.

The order of every change keeps clients safe: an adapter is loaded in the engine before its name
becomes visible; a replaced or unloaded version leaves the engine only after the requests running
on it have finished; the registry file is rewritten after each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters.base_model import BaseModelSpec
from adapters.errors import (
    AdapterError,
    AdapterExists,
    AdapterNotFound,
    AdapterTooLarge,
    InvalidAdapter,
)
from adapters.persistence import RegistryStore
from adapters.registry import AdapterRecord, AdapterRegistry, check_name
from adapters.residency import HostCacheModel
from adapters.sources import resolve_under_roots, store_upload
from adapters.validation import (
    AdapterManifest,
    ValidationLimits,
    validate_adapter,
    write_served_copy,
)
from server.admin.effect_probe import probe_effect
from server.engine.protocol import AdapterRef, EngineDeadError, EngineError, InferenceEngine
from server.http.errors import NotFound, ServiceUnavailable
from server.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


_FAILURE_REASONS: dict[type[Exception], str] = {
    AdapterExists: "exists",
    AdapterNotFound: "not_found",
    AdapterTooLarge: "too_large",
    InvalidAdapter: "invalid",
}


def adapter_ref(record: AdapterRecord) -> AdapterRef:
    return AdapterRef(name=record.name, int_id=record.int_id, path=record.path)


@dataclass(frozen=True)
class Upload:
    """An adapter sent in the request: the two files, or one archive holding them."""

    files: dict[str, bytes] | None = None
    archive: bytes | None = None


@dataclass(frozen=True)
class LoadRequest:
    """What a client asks to load; exactly one of `path` and `upload`."""

    name: str
    path: str | None = None
    upload: Upload | None = None
    replace: bool = False
    pin: bool = False
    allow_base_mismatch: bool = False
    drop_tower_weights: bool = False


class AdapterLease:
    """The adapter a request runs on; released when the request ends, so retirement can wait."""

    def __init__(self, adapter: AdapterRef | None, in_flight: Counter[int]) -> None:
        self.adapter = adapter
        self._in_flight = in_flight
        self._released = adapter is None
        if adapter is not None:
            in_flight[adapter.int_id] += 1

    def another(self) -> AdapterLease:
        """One more lease on the same version (a request with several prompts: one version)."""
        return AdapterLease(self.adapter, self._in_flight)

    def release(self) -> None:
        if not self._released and self.adapter is not None:
            self._released = True
            self._in_flight[self.adapter.int_id] -= 1


@dataclass(frozen=True)
class InstallOptions:
    """How to serve a version pulled from the shared store (its manifest's fields)."""

    store_version: str
    version: int
    pin: bool = False
    allow_base_mismatch: bool = False
    drop_tower_weights: bool = False


@dataclass(frozen=True)
class AdapterSources:
    """Where adapters may come from."""

    roots: list[Path]
    upload_dir: Path
    served_dir: Path  # copies of adapters served without a dropped tower part


class AdapterPublisher(Protocol):
    """Writes loads and unloads through to a shared store (see `server.admin.store_sync`)."""

    async def before_load(self, request: LoadRequest) -> object:
        """Refuse early what the store refuses (the name exists); a token for `publish`."""
        ...

    async def publish(
        self, request: LoadRequest, folder: Path, record: AdapterRecord, token: object
    ) -> None:
        """Write the version, then the manifest; sets the record's store version."""
        ...

    async def withdraw(self, name: str) -> AdapterRecord | None:
        """Delete the manifest; the store's record of it, or None if it had none."""
        ...


class AdapterService:
    """Owns the registry and keeps the engine and the registry file in step with it."""

    def __init__(
        self,
        engine: InferenceEngine,
        registry: AdapterRegistry,
        store: RegistryStore,
        base: BaseModelSpec,
        limits: ValidationLimits,
        sources: AdapterSources,
        metrics: ServiceMetrics,
        host_cache_size: int,
        *,
        probe: bool = True,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._host_cache = HostCacheModel(host_cache_size)
        self.registry = registry
        self._store = store
        self._base = base
        self._limits = limits
        self._sources = sources
        self._probe = probe
        self._in_flight: Counter[int] = Counter()
        self._persist_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.publisher: AdapterPublisher | None = None  # set when a shared store is configured

    @property
    def base_model_name(self) -> str:
        return self.registry.base_model_name

    # Requests

    def acquire(self, model: str) -> AdapterLease:
        """The adapter a request's `model` names (None for the base model); 404 if unknown."""
        if model == self.base_model_name:
            return AdapterLease(None, self._in_flight)
        record = self.registry.find(model)
        if record is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        self.registry.mark_used(model)
        if self._host_cache.touch(record.int_id):
            self._metrics.adapter_on_demand_loads.inc()
        return AdapterLease(adapter_ref(record), self._in_flight)

    def in_flight(self, int_id: int) -> int:
        return self._in_flight[int_id]

    # Changes

    async def load(self, request: LoadRequest) -> AdapterRecord:
        """Validate, load into the engine, then switch the name to the new version at once."""
        started = time.perf_counter()
        try:
            record, replaced = await self._load(request)
        except Exception as exc:
            reason = _FAILURE_REASONS.get(type(exc), "error")
            self._metrics.adapter_load_failures.labels(reason).inc()
            raise
        self._metrics.adapter_loads.inc()
        if replaced:
            self._metrics.adapter_replaces.inc()
        self._metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return record

    async def _load(self, request: LoadRequest) -> tuple[AdapterRecord, bool]:
        check_name(request.name, self.base_model_name)
        async with self.registry.locked(request.name):
            previous = self.registry.find(request.name)
            if previous is not None and not request.replace:
                raise AdapterExists(
                    f"adapter `{request.name}` exists; send replace=true to load a new version"
                )
            token = await self.publisher.before_load(request) if self.publisher else None
            folder, source = await self._folder_of(request)
            try:
                record = await self._load_folder(
                    request.name,
                    folder,
                    source,
                    pin=request.pin,
                    allow_base_mismatch=request.allow_base_mismatch,
                    drop_tower_weights=request.drop_tower_weights,
                    version=previous.version + 1 if previous else 1,
                )
                if self.publisher is not None:
                    try:  # the store names it only once this replica's engine accepted it
                        await self.publisher.publish(request, folder, record, token)
                    except BaseException:
                        await self._discard(record, folder)
                        raise
            except BaseException:
                if request.upload is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            if request.upload is not None and Path(record.path) != folder:
                # Served from a copy without its tower part: the full upload is not needed.
                await asyncio.to_thread(shutil.rmtree, folder, True)
            self.registry.put(record)
            await self._persist()
            if previous is not None:
                self._retire(previous)
            logger.info("adapter %s v%d loaded (id %d)", record.name, record.version, record.int_id)
            return record, previous is not None

    async def unload(self, name: str) -> AdapterRecord:
        """The name disappears at once; the engine's copy goes once its requests have finished."""
        async with self.registry.locked(name):
            withdrawn = await self.publisher.withdraw(name) if self.publisher else None
            if withdrawn is not None and name not in self.registry:
                self._metrics.adapter_unloads.inc()  # registered in the store, not pulled here
                return withdrawn
            record = self.registry.remove(name)
            await self._persist()
        self._retire(record)
        self._metrics.adapter_unloads.inc()
        logger.info("adapter %s unloaded (id %d)", name, record.int_id)
        return record

    async def install(
        self, name: str, folder: Path, source: str, options: InstallOptions
    ) -> AdapterRecord:
        """Serve a version pulled from the shared store under `name` (validated, not probed)."""
        async with self.registry.locked(name):
            previous = self.registry.find(name)
            if (
                previous is not None
                and previous.store_version == options.store_version
                and previous.pinned == options.pin
            ):
                return previous
            record = await self._load_folder(
                name,
                folder,
                source,
                pin=options.pin,
                allow_base_mismatch=options.allow_base_mismatch,
                drop_tower_weights=options.drop_tower_weights,
                version=options.version,
                probe=False,
            )
            record.store_version = options.store_version
            self.registry.put(record)
            await self._persist()
        if previous is not None:
            self._retire(previous)
        logger.info("adapter %s v%d installed from the store", name, record.version)
        return record

    async def forget(self, name: str, store_version: str | None) -> None:
        """Stop serving `name` here if it is still at `store_version` (gone from the store)."""
        async with self.registry.locked(name):
            record = self.registry.find(name)
            if record is None or record.store_version != store_version:
                return
            self.registry.remove(name)
            await self._persist()
        self._retire(record)
        logger.info("adapter %s unloaded here: gone from the store", name)

    async def resident_ids(self) -> set[int]:
        """Ids of the adapter versions the engine holds in memory now."""
        return await self._engine.list_adapters()

    # Start-up

    async def restore(self) -> None:
        """Load the adapters of the registry file again, under their ids; drop what is gone."""
        records, next_id = await asyncio.to_thread(self._store.load)
        self.registry.advance_ids(next_id)
        await self._restore(records)

    async def restore_into_new_engine(self) -> None:
        """After an engine restart: load every registered adapter into it, same ids and pins."""
        self._host_cache = HostCacheModel(self._host_cache.capacity)  # the new engine holds none
        await self._restore(list(self.registry))

    async def _restore(self, records: list[AdapterRecord]) -> None:
        # EngineDeadError propagates: an engine that died must not cost the registry its entries.
        for record in records:
            try:
                await asyncio.to_thread(
                    validate_adapter,
                    Path(record.path),
                    self._base,
                    self._limits,
                    allow_base_mismatch=True,
                )
                await self._engine.add_adapter(adapter_ref(record))
                self._host_cache.touch(record.int_id)
                if record.pinned:
                    await self._engine.pin_adapter(record.int_id)
                    self._host_cache.pin(record.int_id)
            except EngineDeadError:
                raise
            except (AdapterError, EngineError) as exc:
                logger.error("registered adapter %s could not be restored: %s", record.name, exc)
                if self.registry.find(record.name) is record:
                    self.registry.remove(record.name)
                continue
            self.registry.put(record)
        await self._persist()
        logger.info("restored %d registered adapters", len(self.registry))

    async def preload(self, folders: dict[str, Path]) -> None:
        """Register adapter folders found at start-up; invalid ones are logged and skipped."""
        for name, folder in folders.items():
            if name in self.registry:
                continue
            try:
                check_name(name, self.base_model_name)
                async with self.registry.locked(name):
                    record = await self._load_folder(name, folder, name, pin=False)
                    self.registry.put(record)
            except AdapterError as exc:
                logger.error("adapter %s in the preload folder skipped: %s", name, exc.message)
        await self._persist()

    async def shutdown(self) -> None:
        for task in self._retiring:
            task.cancel()

    # Internals

    async def _folder_of(self, request: LoadRequest) -> tuple[Path, str]:
        if (request.path is None) == (request.upload is None):
            raise InvalidAdapter("give exactly one of `path` and an upload")
        if request.path is not None:
            folder = resolve_under_roots(request.path, self._sources.roots)
            return folder, request.path
        assert request.upload is not None
        folder = await asyncio.to_thread(
            store_upload,
            self._sources.upload_dir,
            request.name,
            files=request.upload.files,
            archive=request.upload.archive,
            max_bytes=self._limits.max_adapter_bytes,
        )
        return folder, f"upload:{folder.name}"

    async def _load_folder(
        self,
        name: str,
        folder: Path,
        source: str,
        *,
        pin: bool,
        allow_base_mismatch: bool = False,
        drop_tower_weights: bool = False,
        version: int = 1,
        probe: bool = True,
    ) -> AdapterRecord:
        manifest = await asyncio.to_thread(
            validate_adapter,
            folder,
            self._base,
            self._limits,
            allow_base_mismatch=allow_base_mismatch,
            drop_tower_weights=drop_tower_weights,
        )
        int_id = self.registry.allocate_id()
        served = folder
        if manifest.drops:
            # The engine gets a copy without the tower part; the original is never changed.
            served = self._sources.served_dir.resolve() / f"{name}-{int_id}"
            await asyncio.to_thread(write_served_copy, folder, manifest, served)
        record = AdapterRecord(
            name=name,
            source=source,
            path=str(served),
            sha256=manifest.sha256,
            rank=manifest.rank,
            target_modules=list(manifest.target_modules),
            int_id=int_id,
            version=version,
            pinned=pin,
            dropped_modules=list(manifest.dropped_modules),
            drop_reason=manifest.drop_reason.value if manifest.drop_reason else None,
        )
        try:
            await self._add_to_engine(record, manifest, probe=probe)
        except BaseException:
            if served != folder:
                await asyncio.to_thread(shutil.rmtree, served, True)
            raise
        return record

    async def _add_to_engine(
        self, record: AdapterRecord, manifest: AdapterManifest, *, probe: bool = True
    ) -> None:
        """Load into the engine, pin, probe; on any refusal leave nothing in the engine."""
        try:
            await self._engine.add_adapter(adapter_ref(record))
            self._host_cache.touch(record.int_id)
            if record.pinned:
                if not await self._engine.pin_adapter(record.int_id):
                    raise EngineError("the engine could not pin the adapter")
                self._host_cache.pin(record.int_id)
            # A text probe cannot see a tower part; an adapter serving one is not probed.
            if probe and self._probe and not manifest.serves_towers:
                await self._check_effect(record)
        except EngineDeadError as exc:  # the supervisor restarts it; the client may retry
            self._host_cache.drop(record.int_id)
            raise ServiceUnavailable(str(exc)) from exc
        except EngineError as exc:
            await self._forget(record)
            logger.error("engine refused adapter %s: %s", record.name, exc)
            raise InvalidAdapter(f"the engine could not load adapter `{record.name}`") from exc
        except BaseException:
            await self._forget(record)
            raise

    async def _check_effect(self, record: AdapterRecord) -> None:
        result = await probe_effect(self._engine, adapter_ref(record))
        logger.info(
            "adapter %s probe: largest log-prob change %.3g in %.2f s",
            record.name,
            result.max_logprob_difference,
            result.seconds,
        )
        if not result.changed:
            raise InvalidAdapter(
                f"adapter `{record.name}` loaded, but its greedy output and top log-probs on a "
                "probe prompt equal the base model's: it changes nothing here. Its weights may "
                "be too small to matter, or name modules the engine does not apply; it was "
                "unloaded"
            )

    async def _discard(self, record: AdapterRecord, folder: Path) -> None:
        """Undo `_load_folder`: out of the engine, its served copy deleted."""
        await self._forget(record)
        if Path(record.path) != folder:
            await asyncio.to_thread(shutil.rmtree, record.path, True)

    async def _forget(self, record: AdapterRecord) -> None:
        self._host_cache.drop(record.int_id)
        await self._engine.remove_adapter(record.int_id)

    async def _persist(self) -> None:
        # One writer at a time, each with a snapshot taken under the lock: never an older
        # snapshot over a newer one.
        self._metrics.adapters_registered.set(len(self.registry))
        async with self._persist_lock:
            records = list(self.registry)
            await asyncio.to_thread(self._store.save, records, self.registry.next_id)

    def _retire(self, record: AdapterRecord) -> None:
        task = asyncio.create_task(self._remove_when_idle(record))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _remove_when_idle(self, record: AdapterRecord) -> None:
        while self._in_flight[record.int_id] > 0:
            await asyncio.sleep(0.05)
        del self._in_flight[record.int_id]
        self._host_cache.drop(record.int_id)
        with contextlib.suppress(EngineDeadError):  # a dead engine's copy is gone with it
            await self._engine.remove_adapter(record.int_id)
        folder = Path(record.path)
        ours = (self._sources.upload_dir.resolve(), self._sources.served_dir.resolve())
        if folder.parent in ours:  # uploads and served copies are ours to delete
            await asyncio.to_thread(shutil.rmtree, folder, True)
