"""Timing of one repeated operation: warm-up, repeats within a time budget, robust statistics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["time_runs", "timing_stats", "limited_threads"]


def timing_stats(values: Sequence[float]) -> dict:
    a = np.asarray(values, np.float64)
    q25, q75 = np.percentile(a, [25, 75])
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "iqr": float(q75 - q25), "mean": float(a.mean()), "n": int(a.size)}


def time_runs(run: Callable[[], dict], batch: int, *, repeats: int, warmup: int, budget_s: float,
             estimate_s: float | None, min_timed_s: float = 0.0, max_repeats: int = 200) -> dict:
    """Time ``run`` (one batch of ``batch`` showers): warm-up, then ``repeats`` timed runs, and more
    (up to ``max_repeats``) until ``min_timed_s`` seconds are timed: a run of a few milliseconds is
    at the mercy of every other process, and the median of a handful of them moves by a quarter
    from one benchmark to the next.

    Skipped when the estimated time of one run exceeds the budget; fewer repeats (at least one)
    when the budget runs out.
    """
    if estimate_s is not None and estimate_s > budget_s:
        return {"skipped": f"estimated {estimate_s:.0f} s per batch exceeds the budget of {budget_s:.0f} s"}
    n_warm = warmup if estimate_s is None or estimate_s * (warmup + 1) <= budget_s else 0
    for _ in range(n_warm):
        run()
    seconds, infos = [], []
    started = time.perf_counter()
    while len(seconds) < max(repeats, 1) or (sum(seconds) < min_timed_s and len(seconds) < max_repeats):
        t0 = time.perf_counter()
        infos.append(run())
        seconds.append(time.perf_counter() - t0)
        if time.perf_counter() - started + seconds[-1] > budget_s:
            break
    ms_per_shower = [1000.0 * s / batch for s in seconds]
    out = {"ms_per_shower": timing_stats(ms_per_shower), "showers_per_s": timing_stats([batch / s for s in seconds]),
           "seconds_per_batch": timing_stats(seconds), "repeats": len(seconds), "warmup": n_warm}
    for key in infos[0]:
        out[key] = float(np.mean([info[key] for info in infos]))
    return out


@contextlib.contextmanager
def limited_threads(n: int | None) -> Iterator[None]:
    """Limit torch (and BLAS/OpenMP pools, via threadpoolctl when installed) to ``n`` threads."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=n):
                yield
    finally:
        torch.set_num_threads(previous)
