"""The engine's oneDNN primitive cache is bounded by `python -m server`, and that bounds memory.

vLLM's CPU GEMM (`onednn_mm`) compiles a oneDNN primitive per GEMM shape; oneDNN keeps up to 1024
of them by default, about 0.6-0.7 MiB each, so mixed prompt lengths grew the worker by hundreds of
MiB. `server.__main__` sets a smaller capacity for the engine processes it spawns.
"""

from __future__ import annotations

import os
import subprocess
import sys

from server.__main__ import ONEDNN_PRIMITIVE_CACHE_CAPACITY, bound_engine_memory

# One vLLM GEMM handler fed 512 distinct row counts, as 512 prompt lengths would; prints the RSS
# growth in MiB.
PROBE = """
import psutil, torch
from vllm import _custom_ops as ops
handler = ops.create_onednn_mm(torch.randn(256, 128, dtype=torch.bfloat16).t(), 32)
ops.onednn_mm(handler, torch.randn(1, 128, dtype=torch.bfloat16), None)
before = psutil.Process().memory_info().rss
for rows in range(2, 514):
    ops.onednn_mm(handler, torch.randn(rows, 128, dtype=torch.bfloat16), None)
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def growth_mib(capacity: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
    finished = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return float(finished.stdout.split()[-1])


def test_the_services_capacity_bounds_the_gemm_memory_that_the_default_lets_grow() -> None:
    unbounded = growth_mib(None)
    bounded = growth_mib(ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    assert unbounded > 200, f"oneDNN's default cache kept {unbounded:.0f} MiB"
    assert bounded < 120, f"the service's capacity kept {bounded:.0f} MiB"


def test_the_server_sets_the_capacity_unless_one_is_given() -> None:
    environ: dict[str, str] = {}
    bound_engine_memory(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_PRIMITIVE_CACHE_CAPACITY}
    given = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
    bound_engine_memory(given)
    assert given == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
