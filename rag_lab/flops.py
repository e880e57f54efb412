"""The arithmetic side of every speed figure: this machine's matmul peak, measured in the same run
(float32 GEMM and int8 GEMM side by side), and the model FLOPs a stage did (2 N per token forward,
6 N per token trained, N = parameters without the input embeddings). `rag_lab.reporting.timings` divides one
by the other for results/timings.csv, and every script in benchmarks/ quotes the same peak and the
same parameter count, so no two figures use different conventions.

Torch only: no rag_lab import, so retrievers, the runner and the benchmarks can all use it.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

GEMM_N = 2048  # 17 GFLOP per product: long enough to time, short enough (< 1 s each) to measure every run


# --- the machine's peak -------------------------------------------------------------------------------

@functools.cache
def measure_peaks(repeats: int = 3) -> dict[str, float]:
    """{"float32_gflops", "int8_gops"}: best of `repeats` timed GEMM_N^3 products on the CPU with the
    process's torch threads, float32 and int8 side by side so both see the same machine load.
    Cached: every row a process records quotes the same peaks (a fresh process measures again)."""
    ops = 2.0 * GEMM_N**3  # a (m,k)x(k,n) GEMM is 2mkn operations
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=gen)
    b = torch.randn(GEMM_N, GEMM_N, generator=gen)
    return {"float32_gflops": ops / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9,
            "int8_gops": ops / _best_seconds(_int8_gemm(a, b), repeats) / 1e9}


def _int8_gemm(a, b):
    """A zero-argument int8 GEMM of a and b: the faster, on a 256 x 256 probe, of

    - `torch._int_mm` (int8 x int8 -> int32), the pure integer product — fast where the CPU has
      int8 dot-product instructions, but a slow generic loop elsewhere (measured: 9 s for one
      2048^3 product on an AMD EPYC without VNNI, which made every run pay 45 s here), and
    - fbgemm's dynamic-quantized linear, whose number also includes quantising the float
      activations and dequantising the int32 output (so it slightly understates the GEMM rate).
    """
    qa, qb = (torch.clamp(x * 32, -128, 127).to(torch.int8) for x in (a, b))
    candidates = {}
    try:
        torch._int_mm(qa[:32, :32], qb[:32, :32])
        candidates["int_mm"] = lambda x, y: (lambda: torch._int_mm(x, y))
    except (AttributeError, RuntimeError, NotImplementedError):
        pass

    def fbgemm(x_float, y_float):
        with warnings.catch_warnings():  # quantized tensors are deprecated, not gone
            warnings.simplefilter("ignore", UserWarning)
            weight = torch.quantize_per_tensor(y_float.t().contiguous(), 1 / 32, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(weight, None)
        return lambda: torch.ops.quantized.linear_dynamic(x_float, packed)

    probe = {"int_mm": (qa[:256, :256], qb[:256, :256]), "fbgemm": (a[:256, :256], b[:256, :256])}
    candidates["fbgemm"] = fbgemm
    best = min(candidates, key=lambda name: _best_seconds(candidates[name](*probe[name]), 2))
    return candidates[best](qa, qb) if best == "int_mm" else fbgemm(a, b)


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one untimed warm-up (thread pool, caches, packing)."""
    fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --- model FLOPs ----------------------------------------------------------------------------------------

def decoder_flops(n_params: int, prompt_tokens: int, new_tokens: int) -> float:
    """Forward FLOPs of generating `new_tokens` after `prompt_tokens`: 2 N per token, prompt and new
    alike (N from `count_params`, which keeps a tied LM head). Attention over the context (and
    re-reading the KV cache) is left out: it is small next to 2 N for short RAG prompts."""
    return 2.0 * n_params * (prompt_tokens + new_tokens)


def training_flops(n_params: int, tokens: int) -> float:
    """6 N per trained token: 2 N forward, 4 N backward (gradients of activations and weights)."""
    return 6.0 * n_params * tokens


def encoder_flops(n_params: int, tokens: int) -> float:
    """Forward FLOPs of encoding `tokens` (a retriever embedding queries or passages): 2 N per token."""
    return 2.0 * n_params * tokens


def count_params(model, exclude_input_embeddings: bool = True) -> int:
    """Parameters of a torch module, each shared tensor once. Excluding input embeddings drops the
    weights of every nn.Embedding (token, position, type tables): a lookup does no multiply-adds.
    A table that is also an nn.Linear's weight (an LM head tied to the token embeddings) stays,
    since the head is a real matmul at every generated token."""
    params = {id(p): p for p in model.parameters()}
    if exclude_input_embeddings:
        lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        matmuls = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        output = _output_embedding_weight(model)
        if output is not None:
            matmuls.add(id(output))
        for pid in lookups - matmuls:
            params.pop(pid, None)
    return int(sum(p.numel() for p in params.values()))


def _output_embedding_weight(model):
    """The LM head's weight of a transformers model (None elsewhere); it may be a tied embedding table."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except NotImplementedError:
        return None
    return getattr(head, "weight", None)


def checkpoint_params(folder) -> int:
    """`count_params` of a safetensors checkpoint folder, read from the file headers alone (no weights
    loaded; works for any backend): every tensor but the input embeddings, plus the embedding matrix
    once more when it is tied to the LM head (no lm_head tensor in the file)."""

    total, embed, has_head = 0, 0, False
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = math.prod(f.get_slice(name).get_shape())
                if "embed_tokens" in name or name.endswith("wte.weight") or name.endswith("shared.weight"):
                    embed += numel
                    continue
                has_head |= "lm_head" in name
                total += numel
    return total + (0 if has_head else embed)


def float32_peak(n: int = GEMM_N, repeats: int = 5) -> dict[str, float]:
    """A fresh (uncached) sample of the float32 GEMM rate, for benchmarks that sample the machine
    around each timed part: {"flop_per_s", "best_s", "flop_per_cpu_s", "best_cpu_s"} of the best of
    `repeats` n^3 products after one warm-up (cpu = process CPU time summed over threads)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.mm(a, b)  # warm-up (thread pool, allocation)
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        torch.mm(a, b)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    ops = 2.0 * n**3
    return {"flop_per_s": ops / min(walls), "best_s": min(walls), "flop_per_cpu_s": ops / min(cpus), "best_cpu_s": min(cpus)}
