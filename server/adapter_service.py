"""Adapters as the service runs them: registered, loaded in the engine, resolved per request."""

from __future__ import annotations

import logging
from pathlib import Path

from adapters.errors import AdapterNotFound, InvalidAdapter
from adapters.registry import AdapterRecord, AdapterRegistry, check_name
from server.errors import NotFound
from server.inference_engine import AdapterRef, EngineError, InferenceEngine

logger = logging.getLogger(__name__)


def adapter_ref(record: AdapterRecord) -> AdapterRef:
    return AdapterRef(name=record.name, int_id=record.int_id, path=record.path)


class AdapterService:
    """Owns the registry and keeps the engine in step with it."""

    def __init__(self, engine: InferenceEngine, registry: AdapterRegistry) -> None:
        self._engine = engine
        self.registry = registry

    @property
    def base_model_name(self) -> str:
        return self.registry.base_model_name

    def resolve(self, model: str) -> AdapterRef | None:
        """The adapter a request's `model` names (None for the base model); 404 if unknown."""
        if model == self.base_model_name:
            return None
        record = self.registry.find(model)
        if record is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        self.registry.mark_used(model)
        return adapter_ref(record)

    async def register_folder(self, name: str, folder: Path, source: str) -> AdapterRecord:
        """Load an adapter folder into the engine, then make its name visible."""
        check_name(name, self.base_model_name)
        if not (folder / "adapter_config.json").is_file():
            raise AdapterNotFound(f"no adapter at `{source}`")
        async with self.registry.locked(name):
            record = AdapterRecord(
                name=name,
                source=source,
                path=str(folder),
                sha256="",
                rank=0,
                target_modules=[],
                int_id=self.registry.allocate_id(),
            )
            try:
                await self._engine.add_adapter(adapter_ref(record))
            except EngineError as exc:
                raise InvalidAdapter(f"the engine refused adapter `{name}`") from exc
            self.registry.put(record)
            logger.info("adapter %s registered (id %d)", name, record.int_id)
            return record
