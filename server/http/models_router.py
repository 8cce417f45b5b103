"""`GET /v1/models`: the base model and every ready adapter, in OpenAI's list shape."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from openai.types import Model
from pydantic import BaseModel

from server.admin.adapter_service import AdapterService
from server.admin.store_sync import StoreSync
from server.http.deps import ServicesDep, require_inference_key
from server.http.errors import NotFound
from server.http.openapi import INFERENCE_ROUTE, KEY_OPTIONAL, errors

router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_inference_key)], responses=INFERENCE_ROUTE
)

OWNER = "gemma-adapter-server"


class ModelCard(Model):
    """OpenAI's model, plus `root` (the source) and `parent` (the base, for adapters) as vLLM."""

    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_cards(
    adapters: AdapterService, base_created: int, store: StoreSync | None = None
) -> list[ModelCard]:
    """The base model, the adapters served here, then those only in the shared store (every
    replica serves them: the first request pulls them)."""
    base = adapters.base_model_name
    cards = [ModelCard(id=base, object="model", created=base_created, owned_by=OWNER, root=base)]
    cards += [
        ModelCard(
            id=record.name,
            object="model",
            created=int(record.loaded_at),
            owned_by=OWNER,
            root=record.source,
            parent=base,
        )
        for record in adapters.registry
    ]
    served = {record.name for record in adapters.registry}
    cards += [
        ModelCard(
            id=manifest.name,
            object="model",
            created=int(manifest.updated_at),
            owned_by=OWNER,
            root=manifest.source,
            parent=base,
        )
        for manifest in (store.manifests() if store is not None else [])
        if manifest.name not in served
    ]
    return cards


@router.get("/models", openapi_extra=KEY_OPTIONAL)
async def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=model_cards(services.adapters, services.started_at, services.store))


@router.get("/models/{model_id}", responses=errors(404), openapi_extra=KEY_OPTIONAL)
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    for card in model_cards(services.adapters, services.started_at, services.store):
        if card.id == model_id:
            return card
    raise NotFound(f"The model `{model_id}` does not exist.", param="model")
