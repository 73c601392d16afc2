"""Speed ratios measured in one process: interleaved repeats, medians."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def compare(
    candidate: Callable[[], object], baseline: Callable[[], object], rounds: int = 5, repeats: int = 10
) -> dict[str, float]:
    """Time both functions in alternating rounds (noise hits both alike).

    Returns medians over rounds: ``candidate_s``, ``baseline_s`` and
    ``speedup = baseline_s / candidate_s`` (> 1: the candidate is faster).
    """
    cand, base = [], []
    candidate(), baseline()
    for _ in range(rounds):
        cand.append(median_seconds(candidate, repeats, warmup=1))
        base.append(median_seconds(baseline, repeats, warmup=1))
    cand.sort()
    base.sort()
    cand_s, base_s = cand[len(cand) // 2], base[len(base) // 2]
    return {"candidate_s": cand_s, "baseline_s": base_s, "speedup": base_s / cand_s}
