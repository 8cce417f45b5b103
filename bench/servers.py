"""The targets' processes: command lines with identical engine settings, start, readiness, stop.

Each target runs in its own session (process group), so stopping it reaches vLLM's engine-core
and worker processes too, even when the harness fails half-way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench.adapters import BenchAdapters
from bench.workload import ADMIN_KEY, EngineConfig

logger = logging.getLogger(__name__)

SERVICE = "service"
VLLM = "vllm"
ENGINE = "engine"
TARGETS = (SERVICE, VLLM, ENGINE)
LABELS = {SERVICE: "this service", VLLM: "vllm serve", ENGINE: "engine alone"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def engine_flags(engine: EngineConfig) -> list[str]:
    """The engine settings, under the flag names both servers share."""
    return [
        "--model", engine.model_dir,
        "--served-model-name", engine.served_name,
        "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--seed", str(engine.seed),
        "--max-loras", str(engine.max_loras),
        "--max-cpu-loras", str(engine.max_cpu_loras),
        "--max-lora-rank", str(engine.max_lora_rank),
        "--kv-cache-memory-bytes", str(engine.kv_cache_memory_bytes),
    ]  # fmt: skip


def service_command(
    engine: EngineConfig, adapters: BenchAdapters, port: int, state_dir: Path
) -> list[str]:
    """`python -m server` with the bench's engine settings and adapters."""
    return [
        sys.executable, "-m", "server",
        *engine_flags(engine),
        "--max-images-per-prompt", str(engine.max_images_per_prompt),
        "--max-audios-per-prompt", str(engine.max_audios_per_prompt),
        "--preload-dir", str(adapters.registered_dir),
        "--adapter-roots", str(adapters.hot_dir),
        "--admin-keys", ADMIN_KEY,
        "--state-dir", str(state_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def vllm_command(engine: EngineConfig, adapters: BenchAdapters, port: int) -> list[str]:
    """vLLM's OpenAI server with the settings the service gives its engine (see engine_args)."""
    limits = {
        "image": engine.max_images_per_prompt,
        "audio": engine.max_audios_per_prompt,
        "video": 0,
    }
    structured = {"backend": "xgrammar", "disable_any_whitespace": True}
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *engine_flags(engine),
        "--enable-lora",
        "--limit-mm-per-prompt", json.dumps(limits),
        "--structured-outputs-config", json.dumps(structured),
        "--lora-modules", *(f"{name}={path}" for name, path in adapters.registered.items()),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def vllm_env() -> dict[str, str]:
    env = base_env()
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # enables /v1/load_lora_adapter
    return env


class TargetProcess:
    """A target's process group, its log file, and a clean stop."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("wb")
        logger.info("starting %s (log: %s)", name, log_path)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.perf_counter()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, base_url: str, model: str, timeout: float) -> float:
        """Poll /v1/models until it lists `model`; returns seconds since start."""
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5.0) as http:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = http.get(f"{base_url}/v1/models")
                    if response.status_code == 200 and any(
                        m.get("id") == model for m in response.json().get("data", [])
                    ):
                        return time.perf_counter() - self.started
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM the group, then SIGKILL it and any descendant that left it."""
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        psutil.wait_procs(descendants, timeout=10)
        self._log.close()
