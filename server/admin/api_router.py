"""HTTP routes of the admin API; every route needs an admin key (see `server.http.auth`)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from server.admin.adapter_service import AdapterService, LoadRequest, Upload
from server.admin.protocol import (
    AdapterCreate,
    AdapterList,
    AdapterPublic,
    AdapterUploadForm,
    VllmLoadLoraAdapter,
    VllmUnloadLoraAdapter,
    public_fields,
)
from server.admin.store_sync import record_of
from server.http.deps import ServicesDep, require_admin_key
from server.http.errors import BadRequest
from server.http.openapi import ADMIN_ROUTE, BODY, errors
from server.services import Services

router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)], responses=ADMIN_ROUTE)

ARCHIVE_FIELD = "archive"
_TRUE = {"1", "true", "yes", "on"}


async def _public(adapters: AdapterService, name: str) -> AdapterPublic:
    record = adapters.registry.get(name)
    return AdapterPublic.of(record, resident=record.int_id in await adapters.resident_ids())


def _flag(form: Mapping[str, object], key: str) -> bool:
    value = form.get(key)
    return isinstance(value, str) and value.strip().lower() in _TRUE


async def _load_request(request: Request) -> LoadRequest:
    """JSON {name, path, ...}, or multipart with `name` and an archive or the two files."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form() as form:
            fields = dict(form)
            uploads = {k: v for k, v in fields.items() if isinstance(v, UploadFile)}
            name = fields.get("name")
            if not isinstance(name, str):
                raise BadRequest("the form needs a `name` field", param="name")
            unknown = set(uploads) - {ARCHIVE_FIELD, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
            if unknown:
                raise BadRequest(f"unexpected file fields: {sorted(unknown)}")
            if ARCHIVE_FIELD in uploads:
                upload = Upload(archive=await uploads[ARCHIVE_FIELD].read())
            else:
                upload = Upload(files={k: await v.read() for k, v in uploads.items()})
            return LoadRequest(
                name=name,
                upload=upload,
                replace=_flag(fields, "replace"),
                pin=_flag(fields, "pin"),
                allow_base_mismatch=_flag(fields, "allow_base_mismatch"),
                drop_tower_weights=_flag(fields, "drop_tower_weights"),
            )
    try:
        body = AdapterCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise BadRequest(f"{where or 'body'}: {first['msg']}", param=where or None) from None
    return LoadRequest(
        name=body.name,
        path=body.path,
        replace=body.replace,
        pin=body.pin,
        allow_base_mismatch=body.allow_base_mismatch,
        drop_tower_weights=body.drop_tower_weights,
    )


# One route takes JSON and multipart, so it reads the body itself and declares both here.
_LOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": AdapterCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": AdapterUploadForm.model_json_schema(by_alias=True),
                "encoding": {
                    field: {"contentType": "application/octet-stream"}
                    for field in (ARCHIVE_FIELD, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                },
            },
        },
    }
}


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterPublic,
    responses={
        200: {"model": AdapterPublic, "description": "A new version replaced the old one"},
        **BODY,
        **errors(404, 409),
    },
    openapi_extra=_LOAD_BODY,
)
async def load_adapter(request: Request, services: ServicesDep) -> JSONResponse:
    """Load an adapter (201), or a new version of one with `replace` (200)."""
    load = await _load_request(request)
    record = await services.adapters.load(load)
    # Just loaded into the engine: resident, without asking the engine (a round trip per load).
    public = AdapterPublic.of(record, resident=True)
    # A new version (here or, with a shared store, through any replica) counts from 2.
    return JSONResponse(public.model_dump(), status_code=200 if record.version > 1 else 201)


@router.get("/adapters", response_model=AdapterList, responses=errors(400))
async def list_adapters(
    request: Request,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description="At most this many; unset: all")] = None,
    after: Annotated[str | None, Query(description="Start after this name (a last_id)")] = None,
) -> Response:
    """Registered adapters by name, as one page of OpenAI's list shape (all of them by default)."""
    resident = await services.adapters.resident_ids()
    if limit is None and after is None:
        cache: AdapterListCache = request.app.state.adapter_list
        body = cache.body(services, resident)
    else:
        body = adapter_page(services, resident, limit, after)
    return Response(body, media_type="application/json")


class AdapterListCache:
    """`GET /v1/adapters`' default page (every adapter) serialised once per change of what it
    shows: names, a record's fields (use counts too), the store's listing, the resident set.
    With 1000s of adapters building the page costs ~10 ms idle, a cached body nothing."""

    def __init__(self) -> None:
        self._key: tuple[int, int, frozenset[int]] | None = None
        self._body = b""

    def body(self, services: Services, resident: set[int]) -> bytes:
        store_revision = services.store.revision if services.store is not None else 0
        key = (services.adapters.registry.detail_revision, store_revision, frozenset(resident))
        if key != self._key:
            self._body = adapter_page(services, resident, None, None)
            self._key = key
        return self._body


def adapter_page(
    services: Services, resident: set[int], limit: int | None, after: str | None
) -> bytes:
    """One page of the adapter list, serialised: after the name `after`, at most `limit`."""
    records = services.adapters.registry.by_name()
    stored: set[str] = set()
    if (
        services.store is not None
    ):  # with a shared store: what any replica serves, as of the last poll
        only_there = [
            record_of(manifest)
            for manifest in services.store.manifests()
            if manifest.name not in services.adapters.registry
        ]
        stored = {record.name for record in only_there}
        if only_there:
            records = sorted(records + only_there, key=lambda r: r.name)
    start = bisect.bisect_right(records, after, key=lambda r: r.name) if after is not None else 0
    end = len(records) if limit is None else min(len(records), start + limit)
    page = records[start:end]
    body = {
        "object": "list",
        "data": [
            public_fields(
                record,
                resident=record.int_id in resident,
                state="stored" if record.name in stored else None,
            )
            for record in page
        ],
        "first_id": page[0].name if page else None,
        "last_id": page[-1].name if page else None,
        "has_more": end < len(records),
    }
    # Serialised here, not through the response model: 1000s of adapters in a few ms.
    return json.dumps(body, separators=(",", ":")).encode()


@router.get("/adapters/{name}", responses=errors(404))
async def get_adapter(name: str, services: ServicesDep) -> AdapterPublic:
    return await _public(services.adapters, name)


@router.delete("/adapters/{name}", responses=errors(404))
async def unload_adapter(name: str, services: ServicesDep) -> AdapterPublic:
    """The name is gone at once; running requests on it finish first."""
    record = await services.adapters.unload(name)
    return AdapterPublic.of(record, resident=False, state="unloaded")


@router.post("/load_lora_adapter", responses={**BODY, **errors(404, 409)})
async def vllm_load_lora_adapter(body: VllmLoadLoraAdapter, services: ServicesDep) -> AdapterPublic:
    """vLLM's route and body, answered in JSON; `load_inplace` replaces."""
    record = await services.adapters.load(
        LoadRequest(
            name=body.lora_name,
            path=body.lora_path,
            replace=body.load_inplace,
            drop_tower_weights=body.drop_tower_weights,
        )
    )
    return AdapterPublic.of(record, resident=True)  # just loaded into the engine


@router.post("/unload_lora_adapter", responses={**BODY, **errors(404)})
async def vllm_unload_lora_adapter(
    body: VllmUnloadLoraAdapter, services: ServicesDep
) -> AdapterPublic:
    record = await services.adapters.unload(body.lora_name)
    return AdapterPublic.of(record, resident=False, state="unloaded")
