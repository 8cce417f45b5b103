"""Where an adapter load spends its time: milliseconds per phase, for one log line and a metric.

The phases are a fixed set (`PHASES`), so the metric's `phase` label stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = (
    "validate",  # config, tensor header, lora_B check, sha256 of the weights
    "copy",  # the served copy without a dropped tower part, and its sha256
    "fingerprint",  # stat of the served files
    "engine_add",  # the engine loads the weights (add_lora)
    "pin",
    "probe",  # the effect probe's engine step
    "publish",  # the shared store's version and manifest
    "persist",  # registry.json written and fsynced
)


class LoadPhases:
    """Milliseconds spent in each phase of one load; phases that did not run are left out."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as `name` (added up if the phase runs more than once)."""
        assert name in PHASES, name
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def summary(self) -> str:
        """`total 41 ms: validate 3, fingerprint 0, engine_add 12, probe 20, persist 6`."""
        total = (time.perf_counter() - self.started) * 1000
        parts = ", ".join(
            f"{name} {self.seconds[name] * 1000:.0f}" for name in PHASES if name in self.seconds
        )
        return f"total {total:.0f} ms: {parts}"
