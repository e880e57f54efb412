"""rag_lab.flops: the one peak and FLOP-count module, used by timings.csv and every benchmark."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from rag_lab import flops
from rag_lab.flops import count_params, decoder_flops, encoder_flops, training_flops

REPO = Path(__file__).resolve().parents[1]


def test_flops_formulas():
    assert decoder_flops(1_000_000, 300, 20) == 2 * 1_000_000 * 320 == 640_000_000
    assert training_flops(1_000_000, 1_000) == 6_000_000_000
    assert encoder_flops(22_000_000, 512) == 2 * 22_000_000 * 512 == 22_528_000_000


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)    # 40
        self.pos = nn.Embedding(8, 4)       # 32
        self.hidden = nn.Linear(4, 4)       # 20
        self.head = nn.Linear(4, 10, bias=False)  # 40
        if tied:
            self.head.weight = self.embed.weight


def test_count_params_with_and_without_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))  # 40 + 15
    assert count_params(model) == 15
    assert count_params(model, exclude_input_embeddings=False) == 55
    assert count_params(TinyLM()) == 20 + 40
    assert count_params(TinyLM(), exclude_input_embeddings=False) == 40 + 32 + 20 + 40


def test_count_params_keeps_a_tied_head_once():
    model = TinyLM(tied=True)
    assert count_params(model) == 20 + 40  # the shared table is the LM head's matmul
    assert count_params(model, exclude_input_embeddings=False) == 40 + 32 + 20


def test_measure_peaks_is_positive_and_cached():
    peaks = flops.measure_peaks()
    assert set(peaks) == {"float32_gflops", "int8_gops"}
    assert all(math.isfinite(v) and v > 0 for v in peaks.values())
    assert flops.measure_peaks() is peaks


def test_int8_gemm_is_exact():
    gen = torch.Generator().manual_seed(0)  # values inside b's int8 range (|b| < 4): the comparison is about the path
    a, b = torch.rand(64, 64, generator=gen) * 2 - 1, torch.rand(64, 64, generator=gen) * 2 - 1
    got = flops._int8_gemm(a, b)()
    qa, qb = (torch.clamp(x * 32, -128, 127).to(torch.int8) for x in (a, b))
    if got.dtype == torch.int32:  # torch._int_mm: the integer product itself
        assert torch.equal(got, qa.int() @ qb.int())


def test_int8_gemm_falls_back_to_dynamic_quantized_linear(monkeypatch):
    def unsupported(*args):
        raise RuntimeError("_int_mm: not supported on this backend")

    monkeypatch.setattr(torch, "_int_mm", unsupported)
    gen = torch.Generator().manual_seed(0)  # values inside b's int8 range (|b| < 4): the comparison is about the path
    a, b = torch.rand(64, 64, generator=gen) * 2 - 1, torch.rand(64, 64, generator=gen) * 2 - 1
    got = flops._int8_gemm(a, b)()
    assert got.dtype == torch.float32 and got.shape == (64, 64)
    assert torch.allclose(got, a @ b, atol=0.25)  # b quantised in steps of 1/32, a dynamically


def test_float32_peak_is_a_fresh_sample():
    a, b = flops.float32_peak(256, 2), flops.float32_peak(256, 2)
    assert set(a) == {"flop_per_s", "best_s", "flop_per_cpu_s", "best_cpu_s"}
    assert a["flop_per_s"] == 2.0 * 256**3 / a["best_s"] > 0 and a is not b


def test_no_other_module_or_benchmark_times_its_own_gemm_or_counts_parameters():
    """Issue 23: three matmul-peak timers and two parameter-count conventions; now one of each."""
    gemm = re.compile(r"2(\.0)?\s*\*\s*n\s*\*\*\s*3|\.numel\(\) for p in \w+\.parameters\(\)")
    offenders = [f"{path.relative_to(REPO)}:{i}" for path in [*REPO.glob("benchmarks/*.py"), *REPO.glob("rag_lab/**/*.py")]
                 if path.name != "flops.py"
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if gemm.search(line)]
    assert not offenders, offenders
