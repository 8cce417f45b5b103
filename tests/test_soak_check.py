"""The soak's memory check on synthetic RSS series: a plateau passes, a leak fails.

The worker's RSS rises while oneDNN compiles a primitive for each new GEMM shape, then levels off
(its primitive cache is bounded): the check must accept that, and still catch memory that keeps
growing, however slowly it starts.
"""

from __future__ import annotations

import numpy as np

from bench.soak import MIB, rss_violations, second_half_growth

SECONDS = 180
EVERY = 10


def series(mib_at: list[float]) -> list[tuple[float, int]]:
    return [(i * EVERY, int((800 + mib) * MIB)) for i, mib in enumerate(mib_at)]


def plateau(height: float, seconds_to_level: float, noise: float = 3.0) -> list[float]:
    """Fast growth that levels off at `height` MiB, with allocation noise."""
    times = np.arange(0, SECONDS + 1, EVERY)
    noisy = np.random.default_rng(0).normal(0, noise, times.shape)
    return list(height * (1 - np.exp(-times / (seconds_to_level / 3))) + noisy)


def leak(mib_per_second: float) -> list[float]:
    return [mib_per_second * t for t in range(0, SECONDS + 1, EVERY)]


def test_a_plateau_passes() -> None:
    points = series(plateau(height=150, seconds_to_level=90))
    assert rss_violations("worker", points, max_growth_mib=256, max_late_growth_mib=32) == []


def test_a_steady_leak_fails_on_the_second_half_even_below_the_total_bound() -> None:
    points = series(leak(0.5))  # 90 MiB in 3 minutes: under the 256 MiB total bound
    (violation,) = rss_violations("worker", points, max_growth_mib=256, max_late_growth_mib=32)
    assert "worker RSS still grew 45 MiB in the second half" in violation


def test_a_plateau_above_the_ceiling_fails_on_the_total() -> None:
    points = series(plateau(height=400, seconds_to_level=60))
    (violation,) = rss_violations("worker", points, max_growth_mib=256, max_late_growth_mib=32)
    assert violation.startswith("worker RSS grew 4")


def test_the_growth_of_the_worker_without_the_fix_fails() -> None:
    # Measured: the worker's RSS every 10 s under mixed traffic, oneDNN's default cache (1024).
    measured = [834, 908, 953, 983, 1002, 1025, 1051, 1055, 1055, 1072]
    measured += [1085, 1100, 1108, 1123, 1131, 1133, 1138, 1147, 1149]
    points = series([mib - 800 for mib in measured])
    assert second_half_growth(points) > 32
    assert len(rss_violations("worker", points, 256, 32)) == 2


def test_a_step_down_is_not_growth() -> None:
    points = series([0, 60, 80, 90, 90, 90, 90, 90, 90, 90, 40, 40, 40, 40, 40, 40, 40, 40, 40])
    assert second_half_growth(points) < 0
    assert rss_violations("worker", points, 256, 32) == []
