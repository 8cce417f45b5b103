"""RSS kept by vLLM's CPU GEMM per new GEMM shape: the cause of the soak's worker growth.

    .venv/bin/python -m bench.onednn_cache [--dtype bfloat16] [--rows 2048] [--capacity N]

One vLLM oneDNN GEMM handler (`create_onednn_mm`, as vLLM builds for each linear layer on CPU)
is fed inputs of 2, 3, ... `--rows` rows, as prompts of as many lengths would be, and the
process's RSS growth is logged every 256 new row counts. oneDNN compiles a primitive per shape and
keeps `ONEDNN_PRIMITIVE_CACHE_CAPACITY` of them (1024 by default); `--capacity` sets it for
the run (the service sets 128 for its engine processes).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

logger = logging.getLogger("bench.onednn_cache")

PROBE = """
import sys, psutil, torch
from vllm import _custom_ops as ops
dtype, rows = getattr(torch, sys.argv[1]), int(sys.argv[2])
handler = ops.create_onednn_mm(torch.randn(256, 128, dtype=dtype).t(), 32)
ops.onednn_mm(handler, torch.randn(1, 128, dtype=dtype), None)
before = psutil.Process().memory_info().rss
for count in range(2, rows + 1):
    ops.onednn_mm(handler, torch.randn(count, 128, dtype=dtype), None)
    if count % 256 == 1 or count == rows:
        print(count - 1, (psutil.Process().memory_info().rss - before) / 2**20, flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m bench.onednn_cache", description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--capacity", type=int, help="ONEDNN_PRIMITIVE_CACHE_CAPACITY (unset)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if args.capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.capacity)
    command = [sys.executable, "-c", PROBE, args.dtype, str(args.rows)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as probe:
        assert probe.stdout is not None
        for line in probe.stdout:
            shapes, growth = line.split()
            logger.info(
                "%s, capacity %s: %s new shapes, RSS +%.0f MiB",
                args.dtype,
                args.capacity if args.capacity is not None else "default (1024)",
                shapes,
                float(growth),
            )
    return probe.returncode


if __name__ == "__main__":
    raise SystemExit(main())
