"""Side-by-side benchmark: this service, vLLM's own OpenAI server, and the engine alone.

`python -m bench.compare` (see BENCHMARKS.md) starts each target in turn with the same engine
settings, drives the same seeded streaming workload at it, and reports medians and ratios.
"""
