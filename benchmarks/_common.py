"""Shared by the benchmark scripts: timers. The machine's peak and the model FLOPs are
`rag_lab.flops`'s, the same functions results/timings.csv uses, so a benchmark's fraction of peak
and a stage's × floor count parameters and measure the peak the same way."""
from __future__ import annotations

import time

from rag_lab.flops import count_params, float32_peak


def matmul_peak_flops(repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 GEMMs (`rag_lab.flops.float32_peak`): a fresh sample,
    so scripts can sample the machine around each timed part."""
    return float32_peak(repeats=repeats)["flop_per_s"]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int = 3) -> float:
    return min(_timed(fn) for _ in range(repeats))


def causal_lm_flops_per_token(model) -> float:
    """2 N per token, N = `rag_lab.flops.count_params` (the input embedding lookup does no
    multiply-adds; a tied LM head is a matmul and stays)."""
    return 2.0 * count_params(model)
