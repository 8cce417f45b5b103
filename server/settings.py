"""The service's one settings object: environment variables (GEMMA_SERVER_*) and CLI flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# vLLM accepts only these LoRA ranks as --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Validated once at start-up; every part of the service reads its configuration here."""

    model_config = SettingsConfigDict(
        env_prefix="GEMMA_SERVER_",
        cli_prog_name="gemma-adapter-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    # Model
    model: str | None = Field(
        None,
        description="Path of the Gemma 4 checkpoint. Unset: the tiny Gemma 4 built in cache_dir.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model (default: the model folder name)."
    )
    cache_dir: Path = Field(
        Path(".cache"), description="Where the tiny model and demo adapters are generated."
    )
    dtype: str = Field("auto", description="Weights and activations dtype (auto, float32, ...).")
    max_model_len: int | None = Field(None, gt=0, description="Context length (default: model's).")
    max_num_seqs: int | None = Field(None, gt=0, description="Sequences per engine step.")
    seed: int = Field(0, description="Engine seed.")
    tensor_parallel_size: int = Field(
        1, gt=0, description="GPUs one model is split over (vLLM's tensor parallelism)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Other vLLM engine arguments, as a JSON object of AsyncEngineArgs fields "
        "(e.g. '{\"enforce_eager\": true}'); fields the service sets itself are refused.",
    )

    # LoRA
    max_loras: int = Field(4, gt=0, description="Adapters in one batch (slots on the accelerator).")
    max_lora_rank: int = Field(16, description=f"Largest adapter rank; one of {VLLM_LORA_RANKS}.")
    max_cpu_loras: int | None = Field(
        None, gt=0, description="Adapters kept in host memory (LRU); default max_loras."
    )
    enable_tower_lora: bool = Field(
        False,
        description="Apply adapters' vision-tower, patch-embedder and embed_vision LoRA "
        "(vLLM's experimental enable_tower_connector_lora: every image padded to the largest "
        "patch count, no encoder chunking, encoder cache per adapter); audio-tower LoRA stays "
        "refused.",
    )

    # Memory and multimodal limits
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="KV cache size in bytes (CPU default: 256 MiB)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share (GPU).")
    max_images_per_prompt: int = Field(4, ge=0, description="Images allowed in one request.")
    max_audios_per_prompt: int = Field(1, ge=0, description="Audio clips allowed in one request.")

    max_image_bytes: int = Field(10 * 2**20, gt=0, description="Largest image, in bytes.")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="Largest image, in pixels.")
    max_audio_bytes: int = Field(25 * 2**20, gt=0, description="Largest audio clip, in bytes.")
    max_audio_seconds: float = Field(30.0, gt=0, description="Longest audio clip, in seconds.")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs (off: SSRF).")
    remote_image_timeout_seconds: float = Field(10.0, gt=0, description="Image URL fetch time.")
    max_request_bytes: int = Field(64 * 2**20, gt=0, description="Largest request body.")

    # Adapters
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Adapters to serve, as name=path (comma-separated)."
    )
    preload_dir: Path | None = Field(
        None,
        description="Serve every adapter sub-folder of this folder at start-up "
        "(default with the tiny model: its demo adapters).",
    )
    adapter_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders the admin API may load adapters from (comma-separated); "
        "empty: loading by path is off, uploads still work.",
    )
    state_dir: Path = Field(
        Path(".state"), description="Registry of loaded adapters and uploaded adapter files."
    )
    max_adapter_bytes: int = Field(2**30, gt=0, description="Largest adapter weights, in bytes.")
    allow_pickle_adapters: bool = Field(
        False, description="Accept adapter_model.bin (pickle: loading it can run code)."
    )
    adapter_probe: bool = Field(
        True,
        description="After loading an adapter, compare a short greedy probe with the base "
        "model and refuse an adapter that changes nothing.",
    )

    # Shared adapter store (several replicas): unset, adapters live on this replica only
    adapter_store: str | None = Field(
        None,
        description="Shared adapter store, the source of truth for every replica: "
        "s3://bucket/prefix (credentials from the standard AWS variables) or a folder on a "
        "shared volume. Unset: adapters are this replica's alone.",
    )
    adapter_store_endpoint_url: str | None = Field(
        None, description="S3 endpoint of an S3-compatible store (SeaweedFS, MinIO, ...)."
    )
    adapter_cache_dir: Path | None = Field(
        None,
        description="Local cache of versions pulled from the store (default: state_dir/cache).",
    )
    adapter_cache_max_bytes: int = Field(
        10 * 2**30,
        gt=0,
        description="Bound of the local version cache; least recently used versions not "
        "registered here are evicted first.",
    )
    adapter_store_poll_seconds: float = Field(
        2.0,
        gt=0,
        description="How often each replica checks the store's manifests: a replace or unload "
        "reaches every replica within about this time plus one pull.",
    )

    # Server
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, gt=0, lt=65536, description="Bind port.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Inference API keys (comma-separated); empty: open."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Admin API keys (comma-separated); empty: the admin API is off.",
    )
    admin_open_on_loopback: bool = Field(
        False,
        description="Local development only: admin API without a key, on a loopback bind.",
    )
    metrics_need_admin_key: bool = Field(
        False, description="Serve /metrics only to requests with an admin key."
    )
    metrics_max_adapter_labels: int = Field(
        100, ge=0, description="Adapters with their own metric label; the rest are `other`."
    )
    drain_timeout_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    log_level: str = Field("info", description="Logging level.")
    playground: bool = Field(
        True, description="Serve the playground web page at / and /playground (--no-playground)."
    )

    # Engine supervision
    engine_max_restarts: int = Field(
        3,
        ge=0,
        description="Engine restarts allowed within engine_restart_window_seconds; one more "
        "death and the process exits with status 1 (0: exit on the first death).",
    )
    engine_restart_window_seconds: float = Field(
        600.0, gt=0, description="Window in which engine restarts are counted."
    )

    @field_validator("api_keys", "admin_keys", "lora_modules", "adapter_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _admin_open_only_on_loopback(self) -> Settings:
        if self.admin_open_on_loopback and not is_loopback(self.host):
            raise ValueError("admin_open_on_loopback needs a loopback host (127.0.0.1, ::1)")
        return self

    def served_name(self, model_dir: Path) -> str:
        """The base model's name for clients."""
        return self.served_model_name or model_dir.name

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_accepts(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS}")
        return rank
