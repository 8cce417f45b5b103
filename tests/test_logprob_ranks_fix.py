"""The `logprob_ranks` fix: log-prob requests on a CPU host without a C++ compiler.

Each case runs in a fresh interpreter whose `CXX` names no compiler, as in the service's CPU
image (torch's inductor reads `CXX` when it is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys

from server.vllm_compat import logprob_ranks

RANKS = """
import torch
from server.vllm_compat import register
register()
from vllm.v1.sample import sampler
x = torch.tensor([[0.1, 0.5, 0.3, 0.9], [2.0, 1.0, 3.0, 0.0]])
values = torch.tensor([[0.3], [1.0]])
print(sampler.batched_count_greater_than(x, values).tolist())
"""


def ranks_without_compiler(disabled: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CXX="/nonexistent/g++", GEMMA_SERVER_DISABLE_FIXES=disabled)
    return subprocess.run(
        [sys.executable, "-c", RANKS], env=env, capture_output=True, text=True, timeout=600
    )


def test_log_prob_ranks_need_a_compiler_without_the_fix() -> None:
    done = ranks_without_compiler(disabled="logprob_ranks")
    assert done.returncode != 0
    assert "InvalidCxxCompiler" in done.stderr


def test_fixed_log_prob_ranks_run_without_a_compiler() -> None:
    done = ranks_without_compiler()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[3, 3]"


def test_not_applied_where_a_compiler_exists() -> None:
    assert logprob_ranks.has_cpp_compiler()  # this test machine has g++ (the project's tests)
    assert logprob_ranks.apply() is False
