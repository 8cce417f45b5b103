"""`GET /v1/models`: the base model and every ready adapter, in OpenAI's list shape."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types import Model
from pydantic import BaseModel

from adapters.registry import AdapterRecord
from adapters.store import StoredManifest
from server.admin.adapter_service import AdapterService
from server.admin.store_sync import StoreSync, record_of
from server.http.deps import ServicesDep, require_inference_key
from server.http.errors import NotFound
from server.http.openapi import INFERENCE_ROUTE, KEY_OPTIONAL, errors

router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_inference_key)], responses=INFERENCE_ROUTE
)

OWNER = "gemma-adapter-server"
JSON = "application/json"


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
    cards += [_adapter_card(record, base) for record in adapters.registry]
    cards += [_adapter_card(record_of(manifest), base) for manifest in _store_only(adapters, store)]
    return cards


def _store_only(adapters: AdapterService, store: StoreSync | None) -> list[StoredManifest]:
    """Adapters registered in the shared store and not served here yet."""
    manifests = store.manifests() if store is not None else []
    return [manifest for manifest in manifests if manifest.name not in adapters.registry]


def _adapter_card(record: AdapterRecord, base: str) -> ModelCard:
    return ModelCard(
        id=record.name,
        object="model",
        created=int(record.loaded_at),
        owned_by=OWNER,
        root=record.source,
        parent=base,
    )


class ModelListCache:
    """`GET /v1/models` serialised once per registry or store change: with 1000s of adapters,
    building and serialising the cards costs ~10 ms, a cached body nothing."""

    def __init__(self) -> None:
        self._revision: tuple[int, int] | None = None
        self._body = b""

    def body(self, adapters: AdapterService, base_created: int, store: StoreSync | None) -> bytes:
        revision = (adapters.registry.revision, store.revision if store is not None else 0)
        if revision != self._revision:
            cards = model_cards(adapters, base_created, store)
            self._body = ModelList(data=cards).model_dump_json().encode()
            self._revision = revision
        return self._body


@router.get("/models", response_model=ModelList, openapi_extra=KEY_OPTIONAL)
async def list_models(request: Request, services: ServicesDep) -> Response:
    cache: ModelListCache = request.app.state.model_list
    body = cache.body(services.adapters, services.started_at, services.store)
    return Response(body, media_type=JSON)


@router.get("/models/{model_id}", responses=errors(404), openapi_extra=KEY_OPTIONAL)
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    base = services.adapters.base_model_name
    if model_id == base:
        return ModelCard(
            id=base, object="model", created=services.started_at, owned_by=OWNER, root=base
        )
    record = services.adapters.registry.find(model_id)
    if record is not None:
        return _adapter_card(record, base)
    for manifest in _store_only(services.adapters, services.store):
        if manifest.name == model_id:
            return _adapter_card(record_of(manifest), base)
    raise NotFound(f"The model `{model_id}` does not exist.", param="model")
