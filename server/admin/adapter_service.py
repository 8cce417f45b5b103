"""Adapters as the service runs them: validated, loaded in the engine, switched, retired, persisted.

The order of every change keeps clients safe: an adapter is loaded in the engine before its name
becomes visible; a replaced or unloaded version leaves the engine only after the requests running
on it have finished; the registry file is rewritten after each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from adapters.fingerprint import folder_fingerprint
from adapters.persistence import RegistryStore
from adapters.registry import AdapterRecord, AdapterRegistry, check_name
from adapters.residency import HostCacheModel
from adapters.sources import resolve_under_roots, sha256_file, store_upload
from adapters.validation import (
    SAFETENSORS_FILE,
    AdapterManifest,
    ValidationLimits,
    validate_adapter,
    write_served_copy,
)
from server.admin.effect_probe import probe_effect
from server.admin.load_phases import LoadPhases
from server.engine.protocol import (
    AdapterRef,
    EngineDeadError,
    EngineError,
    InferenceEngine,
    ResidentAdapter,
)
from server.http.errors import NotFound, ServiceUnavailable
from server.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

PENDING_SAVE_SECONDS = 1.0  # the background validation saves the registry file this often


_FAILURE_REASONS: dict[type[Exception], str] = {
    AdapterExists: "exists",
    AdapterNotFound: "not_found",
    AdapterTooLarge: "too_large",
    InvalidAdapter: "invalid",
}


def adapter_ref(record: AdapterRecord) -> AdapterRef:
    return AdapterRef(name=record.name, int_id=record.int_id, path=record.path)


def _unavailable(record: AdapterRecord, why: str) -> str:
    return (
        f"adapter `{record.name}` is registered but cannot be served: {why}. Other models "
        "are served; the operator can load it again or unload it"
    )


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
        # New names being loaded, written to the registry file ahead of the name switch (while
        # the engine loads and probes them) and withdrawn from it if the engine refuses them.
        self._saved_ahead: dict[str, AdapterRecord] = {}
        self._follow_ups: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._first_use: dict[int, asyncio.Lock] = {}
        self._background: asyncio.Task[None] | None = None
        self._validated_unsaved = False  # background validations not in the registry file yet
        self.publisher: AdapterPublisher | None = None  # set when a shared store is configured

    @property
    def base_model_name(self) -> str:
        return self.registry.base_model_name

    # Requests

    async def acquire(self, model: str) -> AdapterLease:
        """The adapter a request's `model` names (None for the base model); 404 if unknown.

        An adapter not in host memory (by the service's model of the engine's cache) is loaded
        here, before the request reaches the engine: its files are checked against the
        registry and a file that vanished or changed gives this request a 503, where the
        engine would otherwise fail inside a batch (vLLM loads a request's adapter from its
        path when it schedules it, and a failure there kills the engine core).
        """
        if model == self.base_model_name:
            return AdapterLease(None, self._in_flight)
        while True:
            record = self.registry.find(model)
            if record is None:
                raise NotFound(f"The model `{model}` does not exist.", param="model")
            if record.int_id in self._host_cache:
                break
            await self._load_on_demand(record)
            self._metrics.adapter_on_demand_loads.inc()
            if self.registry.find(model) is record:
                break  # else replaced or unloaded while it loaded: take what the name is now
        self.registry.mark_used(model)
        self._host_cache.touch(record.int_id)
        # Taken before any await: retirement cannot remove this version under the request.
        return AdapterLease(adapter_ref(record), self._in_flight)

    def in_flight(self, int_id: int) -> int:
        return self._in_flight[int_id]

    # Changes

    async def load(self, request: LoadRequest) -> AdapterRecord:
        """Validate, load into the engine, then switch the name to the new version at once."""
        phases = LoadPhases()
        try:
            record, replaced = await self._load(request, phases)
        except Exception as exc:
            reason = _FAILURE_REASONS.get(type(exc), "error")
            self._metrics.adapter_load_failures.labels(reason).inc()
            logger.info("adapter %s load refused after %s", request.name, phases.summary())
            raise
        self._metrics.adapter_loads.inc()
        if replaced:
            self._metrics.adapter_replaces.inc()
        self._metrics.adapter_load_seconds.observe(time.perf_counter() - phases.started)
        for name, seconds in phases.seconds.items():
            self._metrics.adapter_load_phase_seconds.labels(name).observe(seconds)
        logger.info(
            "adapter %s v%d loaded (id %d), %s",
            record.name,
            record.version,
            record.int_id,
            phases.summary(),
        )
        return record

    async def _load(self, request: LoadRequest, phases: LoadPhases) -> tuple[AdapterRecord, bool]:
        check_name(request.name, self.base_model_name)
        async with self.registry.locked(request.name):
            previous = self.registry.find(request.name)
            if previous is not None and not request.replace:
                raise AdapterExists(
                    f"adapter `{request.name}` exists; send replace=true to load a new version"
                )
            token = await self.publisher.before_load(request) if self.publisher else None
            folder, source = await self._folder_of(request)
            # A new name is saved while the engine loads it. Not a replace: until the new
            # version has passed, the file keeps the old one (a crash keeps serving it). Not
            # with a shared store: its version is known, and saved, only after publishing.
            save_ahead = previous is None and self.publisher is None
            try:
                record, saving = await self._load_folder(
                    request.name,
                    folder,
                    source,
                    pin=request.pin,
                    allow_base_mismatch=request.allow_base_mismatch,
                    drop_tower_weights=request.drop_tower_weights,
                    version=previous.version + 1 if previous else 1,
                    phases=phases,
                    save_ahead=save_ahead,
                )
                if self.publisher is not None:
                    try:  # the store names it only once this replica's engine accepted it
                        with phases.phase("publish"):
                            await self.publisher.publish(request, folder, record, token)
                    except BaseException:
                        await self._discard(record, folder)
                        raise
            except BaseException:
                if request.upload is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            self.registry.put(record)
            saved = self._saved_ahead.pop(record.name, None)
            if request.upload is not None and Path(record.path) != folder:
                # Served from a copy without its tower part: the full upload is not needed.
                await asyncio.to_thread(shutil.rmtree, folder, True)
            if saving is None:
                with phases.phase("persist"):
                    await self._persist()
            else:
                await saving  # the file names the adapter before the client hears of it
                if saved is not None and saved.probed != record.probed:
                    self._persist_later()  # the probe passed since the save: say so
            if previous is not None:
                self._retire(previous)
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
            record, _ = await self._load_folder(
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
        """Ids of the adapter versions the engine holds in memory (its residency, cached)."""
        return {entry.int_id for entry in await self._engine.adapter_residency()}

    def served_residency(self, resident: list[ResidentAdapter]) -> list[tuple[str, str, bool]]:
        """(served name, level, pinned) of the resident adapters clients can name now.

        Versions no name points to any more (replaced or unloaded, still draining) are left out:
        a request naming the adapter would not run on them.
        """
        current = {record.int_id: record.name for record in self.registry}
        return [
            (current[entry.int_id], entry.level, entry.pinned)
            for entry in resident
            if entry.int_id in current
        ]

    # Start-up

    async def restore(self) -> None:
        """Register the adapters of the registry file again, same ids; nothing is loaded yet.

        Validation results are the records themselves (sha256, rank, targets, probe done): an
        adapter is not validated again while its files' fingerprint (size, mtime, inode) is
        the one recorded. Only pinned adapters are loaded into the engine now; the others are
        loaded at their first request. Adapters whose files are gone are dropped.
        """
        started = time.perf_counter()
        records, next_id = await asyncio.to_thread(self._store.load)
        self.registry.advance_ids(next_id)
        await self._restore(records)
        logger.info("registry restored in %.3f s", time.perf_counter() - started)

    async def restore_into_new_engine(self) -> None:
        """After an engine restart: pinned adapters again, the others at their first request."""
        self._host_cache = HostCacheModel(self._host_cache.capacity)  # the new engine holds none
        await self._restore(list(self.registry))

    async def _restore(self, records: list[AdapterRecord]) -> None:
        # EngineDeadError propagates: an engine that died must not cost the registry its entries.
        fingerprints = await asyncio.to_thread(
            lambda: [folder_fingerprint(Path(record.path)) for record in records]
        )
        dropped = False
        for record, fingerprint in zip(records, fingerprints, strict=True):
            if fingerprint is None:
                logger.error("registered adapter %s dropped: its files are gone", record.name)
                if self.registry.find(record.name) is record:
                    self.registry.remove(record.name)
                dropped = True
                continue
            self.registry.put(record)
            if record.pinned:
                try:
                    await self._load_on_demand(record)
                    if not await self._engine.pin_adapter(record.int_id):
                        raise EngineError("the engine could not pin the adapter")
                    self._host_cache.pin(record.int_id)
                except EngineDeadError:
                    raise
                except (AdapterError, EngineError, ServiceUnavailable) as exc:
                    # Kept registered: a request for it gets the reason, the rest serves.
                    logger.error("pinned adapter %s could not be loaded: %s", record.name, exc)
        # The file is rewritten only if this dropped an adapter: a restart that changes
        # nothing writes nothing (loading a pinned adapter saves what it changes itself).
        if dropped:
            await self._persist()
        else:
            self._metrics.adapters_registered.set(len(self.registry))
        logger.info(
            "restored %d registered adapters (%d pinned loaded, %d to check at first use)",
            len(self.registry),
            sum(1 for record in records if record.pinned and record.int_id in self._host_cache),
            sum(1 for r, f in zip(records, fingerprints, strict=True) if f != r.fingerprint),
        )

    async def preload(self, folders: dict[str, Path]) -> None:
        """Register adapter folders found at start-up, as pending: validated later.

        Validating costs ~10 ms per adapter, seconds for thousands, so a new folder is only
        registered here (its name is served at once). It is validated at its first request or
        by `validate_pending` in the background, whichever comes first; an invalid one is then
        logged and unregistered. It is loaded into the engine (and probed) at its first
        request, like every unpinned adapter. Names already registered are left as they are.
        """
        started = time.perf_counter()
        added = 0
        for name, folder in folders.items():
            if name in self.registry:
                continue
            try:
                check_name(name, self.base_model_name)
                async with self.registry.locked(name):
                    self.registry.put(self._pending_record(name, folder))
                    added += 1
            except AdapterError as exc:
                logger.error("adapter %s in the preload folder skipped: %s", name, exc.message)
        if added:  # one write for all of them; none when every folder was registered already
            await self._persist()
        logger.info(
            "preload: %d new of %d folders registered in %.3f s",
            added,
            len(folders),
            time.perf_counter() - started,
        )

    def start_validating_pending(self) -> None:
        """Validate pending adapters in the background, one at a time, in name order."""
        self._background = asyncio.create_task(self._validate_all_pending())

    async def _validate_all_pending(self) -> None:
        # Saved at most once a second, not after each adapter: a save of 1000 records holds the
        # GIL for ~30 ms; a validation lost to a crash before its save is only done again, and
        # `shutdown` saves what is left.
        saved_at = time.monotonic()
        for record in list(self.registry):
            if record.validated:
                continue
            async with self._first_use.setdefault(record.int_id, asyncio.Lock()):
                if record.validated or self.registry.find(record.name) is not record:
                    continue
                with contextlib.suppress(ServiceUnavailable):  # logged and unregistered
                    await self._validate_pending(record, save=False)
                    self._validated_unsaved = True
            if self._validated_unsaved and time.monotonic() - saved_at >= PENDING_SAVE_SECONDS:
                await self._save_validated()
                saved_at = time.monotonic()
        await self._save_validated()

    async def _save_validated(self) -> None:
        if self._validated_unsaved:
            self._validated_unsaved = False
            await self._persist()

    async def shutdown(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
            try:
                await self._save_validated()
            except OSError:  # the engine must still be shut down; validations are redone
                logger.exception("the registry file could not be saved at shutdown")
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._follow_ups)  # a few ms each

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
        phases: LoadPhases | None = None,
        save_ahead: bool = False,
    ) -> tuple[AdapterRecord, asyncio.Task[None] | None]:
        """Validate, load into the engine, probe; the record, and the save under way if any.

        With `save_ahead`, the registry file is written with the record while the engine loads
        and probes it (the probe still due, as far as the file knows), and rewritten without it
        if the engine refuses it; the caller awaits the returned save before answering.
        """
        phases = phases or LoadPhases()
        record, manifest = await self._validated_record(
            name,
            folder,
            source,
            self.registry.allocate_id(),
            pin=pin,
            version=version,
            allow_base_mismatch=allow_base_mismatch,
            drop_tower_weights=drop_tower_weights,
            phases=phases,
        )
        served = Path(record.path)
        saving = None
        if save_ahead:
            probed = not (probe and self._probe and not manifest.serves_towers)
            self._saved_ahead[name] = dataclasses.replace(record, probed=probed)
            saving = asyncio.create_task(self._timed_persist(phases))
        try:
            await self._add_to_engine(record, manifest, phases, probe=probe)
        except BaseException:
            if saving is not None:
                del self._saved_ahead[name]
                with contextlib.suppress(Exception):  # rewritten now in any case
                    await saving
                try:
                    await self._persist()
                except Exception:  # the refusal is what the client must hear
                    logger.exception("registry file still names refused adapter %s", name)
            if served != folder:
                await asyncio.to_thread(shutil.rmtree, served, True)
            raise
        return record, saving

    async def _validated_record(
        self,
        name: str,
        folder: Path,
        source: str,
        int_id: int,
        *,
        pin: bool,
        version: int,
        allow_base_mismatch: bool = False,
        drop_tower_weights: bool = False,
        phases: LoadPhases | None = None,
    ) -> tuple[AdapterRecord, AdapterManifest]:
        """Validate `folder`; the record to serve it as (a copy without a dropped tower part)."""
        phases = phases or LoadPhases()
        with phases.phase("validate"):
            manifest = await asyncio.to_thread(
                validate_adapter,
                folder,
                self._base,
                self._limits,
                allow_base_mismatch=allow_base_mismatch,
                drop_tower_weights=drop_tower_weights,
            )
        served = folder
        served_sha256 = None
        if manifest.drops:
            # The engine gets a copy without the tower part; the original is never changed.
            served = self._sources.served_dir.resolve() / f"{name}-{int_id}"
            with phases.phase("copy"):
                await asyncio.to_thread(write_served_copy, folder, manifest, served)
                served_sha256 = await asyncio.to_thread(sha256_file, served / SAFETENSORS_FILE)
        # Taken after validation: a change while it ran shows as a mismatch at first use.
        with phases.phase("fingerprint"):
            fingerprint = await asyncio.to_thread(folder_fingerprint, served)
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
            fingerprint=fingerprint,
            served_sha256=served_sha256,
        )
        return record, manifest

    async def _add_to_engine(
        self,
        record: AdapterRecord,
        manifest: AdapterManifest,
        phases: LoadPhases,
        *,
        probe: bool = True,
    ) -> None:
        """Load into the engine, pin, probe; on any refusal leave nothing in the engine."""
        try:
            with phases.phase("engine_add"):
                await self._engine.add_adapter(adapter_ref(record))
            self._host_cache.touch(record.int_id)
            if record.pinned:
                with phases.phase("pin"):
                    if not await self._engine.pin_adapter(record.int_id):
                        raise EngineError("the engine could not pin the adapter")
                self._host_cache.pin(record.int_id)
            # A text probe cannot see a tower part; an adapter serving one is not probed.
            if probe and self._probe and not manifest.serves_towers:
                with phases.phase("probe"):
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

    async def _load_on_demand(self, record: AdapterRecord) -> None:
        """Check the files if not yet done, load into the engine, probe if still due; else 503."""
        async with self._first_use.setdefault(record.int_id, asyncio.Lock()):
            if record.int_id in self._host_cache:
                return  # a concurrent request loaded it meanwhile
            await self._check_files(record)
            try:
                await self._engine.add_adapter(adapter_ref(record))
            except EngineError as exc:
                if isinstance(exc, EngineDeadError):
                    raise
                logger.error("registered adapter %s could not be loaded: %s", record.name, exc)
                raise ServiceUnavailable(
                    _unavailable(record, "the engine could not load it")
                ) from exc
            self._host_cache.touch(record.int_id)
            if not record.probed:
                await self._probe_at_first_use(record)

    async def _check_files(self, record: AdapterRecord) -> None:
        """The served files are the ones registered: same fingerprint, or else same content."""
        if not record.validated:
            await self._validate_pending(record)
            return
        folder = Path(record.path)
        fingerprint = await asyncio.to_thread(folder_fingerprint, folder)
        if fingerprint is None:
            logger.error("registered adapter %s: its files are missing", record.name)
            raise ServiceUnavailable(_unavailable(record, "its files are missing"))
        if fingerprint != record.fingerprint:
            try:
                manifest = await asyncio.to_thread(
                    validate_adapter, folder, self._base, self._limits, allow_base_mismatch=True
                )
            except AdapterError as exc:
                logger.error("registered adapter %s no longer validates: %s", record.name, exc)
                raise ServiceUnavailable(
                    _unavailable(record, f"its files changed and are invalid: {exc.message}")
                ) from exc
            # A served copy registered before copies were hashed is known only by validity.
            unknown_copy = bool(record.dropped_modules) and record.served_sha256 is None
            same = manifest.sha256 == (record.served_sha256 or record.sha256) or unknown_copy
            if not same or (manifest.rank, manifest.target_modules) != (
                record.rank,
                record.target_modules,
            ):
                logger.error("registered adapter %s: its files changed", record.name)
                raise ServiceUnavailable(
                    _unavailable(
                        record,
                        "its files changed since it was registered; load it again with "
                        "replace=true to serve the new version",
                    )
                )
            record.fingerprint = fingerprint
            if unknown_copy:
                record.served_sha256 = manifest.sha256
            await self._persist()

    def _pending_record(self, name: str, folder: Path) -> AdapterRecord:
        return AdapterRecord(
            name=name,
            source=name,
            path=str(folder),
            sha256="",
            rank=0,
            target_modules=[],
            int_id=self.registry.allocate_id(),
            probed=not self._probe,
            validated=False,
        )

    async def _validate_pending(self, record: AdapterRecord, *, save: bool = True) -> None:
        """Validate a pending adapter; fill its record in, or unregister it (503 to the caller).

        `save=False` leaves the registry file to the caller (the background validation).
        """
        try:
            checked, manifest = await self._validated_record(
                record.name,
                Path(record.path),
                record.source,
                record.int_id,
                pin=record.pinned,
                version=record.version,
            )
        except AdapterError as exc:
            logger.error("adapter %s in the preload folder skipped: %s", record.name, exc.message)
            await self._unregister(record)
            raise ServiceUnavailable(
                f"adapter `{record.name}` cannot be served and was unregistered: {exc.message}"
            ) from exc
        # The same object: leases and the registry already hold it.
        record.path = checked.path
        record.sha256 = checked.sha256
        record.rank = checked.rank
        record.target_modules = checked.target_modules
        record.dropped_modules = checked.dropped_modules
        record.drop_reason = checked.drop_reason
        record.fingerprint = checked.fingerprint
        record.served_sha256 = checked.served_sha256
        record.probed = record.probed or manifest.serves_towers  # a text probe cannot see towers
        record.validated = True
        self.registry.record_changed()
        if save:
            await self._persist()

    async def _unregister(self, record: AdapterRecord) -> None:
        async with self.registry.locked(record.name):
            if self.registry.find(record.name) is record:
                self.registry.remove(record.name)
                await self._persist()
        self._retire(record)

    async def _probe_at_first_use(self, record: AdapterRecord) -> None:
        """The effect probe of an adapter registered without the engine (the preload folder)."""
        try:
            await self._check_effect(record)
        except InvalidAdapter as exc:
            await self._unregister(record)
            raise ServiceUnavailable(exc.message) from exc
        record.probed = True
        await self._persist()

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
        # Every change of a record's fields is saved here, so listings learn of it here too.
        self.registry.record_changed()
        async with self._persist_lock:
            records = list(self.registry)
            if self._saved_ahead:  # new names still loading (never a registered name)
                records = sorted([*records, *self._saved_ahead.values()], key=lambda r: r.name)
            await asyncio.to_thread(self._store.save, records, self.registry.next_id)

    async def _timed_persist(self, phases: LoadPhases) -> None:
        with phases.phase("persist"):
            await self._persist()

    def _persist_later(self) -> None:
        """Save in the background: for what a crash may lose at no risk (a probe passed)."""

        async def persist() -> None:
            try:
                await self._persist()
            except Exception:  # the next change saves it again
                logger.exception("saving the adapter registry failed")

        task = asyncio.create_task(persist())
        self._follow_ups.add(task)
        task.add_done_callback(self._follow_ups.discard)

    def _retire(self, record: AdapterRecord) -> None:
        task = asyncio.create_task(self._remove_when_idle(record))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _remove_when_idle(self, record: AdapterRecord) -> None:
        while self._in_flight[record.int_id] > 0:
            await asyncio.sleep(0.05)
        del self._in_flight[record.int_id]
        self._host_cache.drop(record.int_id)
        self._first_use.pop(record.int_id, None)
        with contextlib.suppress(EngineDeadError):  # a dead engine's copy is gone with it
            await self._engine.remove_adapter(record.int_id)
        folder = Path(record.path)
        ours = (self._sources.upload_dir.resolve(), self._sources.served_dir.resolve())
        if folder.parent in ours:  # uploads and served copies are ours to delete
            await asyncio.to_thread(shutil.rmtree, folder, True)
