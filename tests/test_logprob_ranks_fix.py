"""The `logprob_ranks` fix: the first log-prob request on CPU, with and without a C++ compiler.

Each case runs in a fresh interpreter. Without a compiler (`CXX` names none, as in the service's
CPU image; torch's inductor reads `CXX` when it is imported) vLLM's compiled count fails; with one
(this machine) it compiles C++ at the first call, which the first effect probe waited for.
"""

from __future__ import annotations

import os
import subprocess
import sys

RANKS = """
import torch
from server.vllm_compat import register
register()
from vllm.v1.sample import sampler
x = torch.tensor([[0.1, 0.5, 0.3, 0.9], [2.0, 1.0, 3.0, 0.0]])
values = torch.tensor([[0.3], [1.0]])
print(sampler.batched_count_greater_than(x, values).tolist())
from torch._dynamo.utils import counters
print(counters["stats"]["unique_graphs"])  # graphs torch.compile built
"""


def ranks(disabled: str = "", **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GEMMA_SERVER_DISABLE_FIXES=disabled, **env_vars)
    return subprocess.run(
        [sys.executable, "-c", RANKS], env=env, capture_output=True, text=True, timeout=600
    )


def test_log_prob_ranks_need_a_compiler_without_the_fix() -> None:
    done = ranks(disabled="logprob_ranks", CXX="/nonexistent/g++")
    assert done.returncode != 0
    assert "InvalidCxxCompiler" in done.stderr


def test_fixed_log_prob_ranks_run_without_a_compiler() -> None:
    done = ranks(CXX="/nonexistent/g++")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["[3, 3]", "0"]


def test_with_a_compiler_the_first_call_compiles_without_the_fix() -> None:
    from torch._inductor import cpp_builder

    cpp_builder.get_cpp_compiler()  # this machine has g++ (raises if not)
    done = ranks(disabled="logprob_ranks")
    assert done.returncode == 0, done.stderr[-2000:]
    result, graphs = done.stdout.strip().splitlines()[-2:]
    assert result == "[3, 3]" and int(graphs) >= 1


def test_fixed_with_a_compiler_nothing_is_compiled() -> None:
    done = ranks()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["[3, 3]", "0"]
