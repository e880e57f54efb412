"""Shared by the benchmark scripts: the machine's float32 matmul peak, measured in the same run."""
from __future__ import annotations

import time

import torch


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n float32 matmul: the physical limit ratios are taken against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int = 3) -> float:
    return min(_timed(fn) for _ in range(repeats))


def causal_lm_flops_per_token(model) -> float:
    """2 x parameters touched per token (the embedding lookup is free; the tied LM head is a matmul)."""
    n = sum(p.numel() for p in model.parameters())
    return 2.0 * n  # tied embeddings: counted once, as the LM head's matmul
