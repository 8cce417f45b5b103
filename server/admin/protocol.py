"""Wire models of the admin API (JSON in, JSON out)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.registry import AdapterRecord
from adapters.validation import DropReason


class AdapterCreate(BaseModel):
    """`POST /v1/adapters` as JSON: an adapter folder under one of the allowed roots."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str = Field(min_length=1)
    replace: bool = False
    pin: bool = False
    allow_base_mismatch: bool = False
    drop_tower_weights: bool = False


class AdapterUploadForm(BaseModel):
    """`POST /v1/adapters` as multipart: `name` and an archive, or the two adapter files.

    Documents the form in the OpenAPI document; the route reads the form itself, since one
    route takes JSON and multipart.
    """

    name: str
    archive: bytes | None = Field(None, description="A .tar.gz or .zip of the adapter folder")
    adapter_config: bytes | None = Field(None, alias="adapter_config.json")
    adapter_model: bytes | None = Field(None, alias="adapter_model.safetensors")
    replace: bool = False
    pin: bool = False
    allow_base_mismatch: bool = False


class VllmLoadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body, plus this server's `drop_tower_weights`."""

    lora_name: str
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    drop_tower_weights: bool = False


class DroppedPart(BaseModel):
    """The tower part of an adapter that is not served, and what that means for requests."""

    reason: Literal["zero_lora_b", "no_media", "requested"]
    meaning: str
    module_count: int
    modules: list[str]


class VllmUnloadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is accepted and ignored)."""

    lora_name: str
    lora_int_id: int | None = None


class AdapterPublic(BaseModel):
    """An adapter as clients see it (no server paths)."""

    object: Literal["adapter"] = "adapter"
    name: str
    source: str
    version: int
    sha256: str
    rank: int
    target_modules: list[str]
    id: int
    # stored: registered in the shared adapter store, not loaded on this replica yet (id 0)
    state: Literal["ready", "unloaded", "stored"]
    loaded_at: int
    pinned: bool
    resident: bool
    last_used: int | None
    request_count: int
    dropped: DroppedPart | None  # null: every part of the adapter is served

    @classmethod
    def of(cls, record: AdapterRecord, *, resident: bool, state: str = "ready") -> AdapterPublic:
        return cls(
            name=record.name,
            source=record.source,
            version=record.version,
            sha256=record.sha256,
            rank=record.rank,
            target_modules=record.target_modules,
            id=record.int_id,
            state=state,
            loaded_at=int(record.loaded_at),
            pinned=record.pinned,
            resident=resident,
            last_used=int(record.last_used) if record.last_used else None,
            request_count=record.request_count,
            dropped=_dropped(record),
        )


def _dropped(record: AdapterRecord) -> DroppedPart | None:
    if not record.drop_reason:
        return None
    reason = DropReason(record.drop_reason)
    return DroppedPart(
        reason=reason.value,
        meaning=reason.meaning,
        module_count=len(record.dropped_modules),
        modules=record.dropped_modules,
    )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]
