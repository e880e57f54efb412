"""rag_lab.timings: FLOPs formulas, parameter counts, the timings table and the measured peaks."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from rag_lab import timings
from rag_lab.timings import StageTiming, count_params, decoder_flops, encoder_flops, record, timed, training_flops

PEAKS = {"float32_gflops": 100.0, "int8_gops": 400.0}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A private results folder and fixed peaks, so floors are exact."""
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(timings, "measure_peaks", lambda repeats=3: dict(PEAKS))
    return tmp_path / "results"


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


def test_record_computes_floor_and_upserts_by_stage(results):
    row = record(StageTiming("row rag_zero_shot", 10.0, flops=2e11, precision="float32"))
    assert row["peak"] == 100.0 and row["floor_s"] == pytest.approx(2.0) and row["of_floor"] == pytest.approx(5.0)
    assert (row["float32_gflops"], row["int8_gops"]) == (100.0, 400.0)
    record(StageTiming("row rag_int8", 3.0, flops=4e11, precision="int8"))
    record(StageTiming("data nq-mini", 1.5, note="build"))
    record(StageTiming("row rag_zero_shot", 4.0, flops=2e11, precision="float32"))  # replaces the first

    table = timings.load_timings().set_index("stage")
    assert list(table.index) == ["data nq-mini", "row rag_int8", "row rag_zero_shot"]
    assert table.loc["row rag_zero_shot", "wall_s"] == 4.0
    assert table.loc["row rag_zero_shot", "of_floor"] == pytest.approx(2.0)
    assert table.loc["row rag_int8", "peak"] == 400.0
    assert table.loc["row rag_int8", "floor_s"] == pytest.approx(1.0)
    assert table.loc["row rag_int8", "of_floor"] == pytest.approx(3.0)
    data = table.loc["data nq-mini"]
    assert all(pd.isna(data[c]) for c in ("flops", "peak", "floor_s", "of_floor"))
    assert data["float32_gflops"] == 100.0 and data["note"] == "build"
    assert list(timings.load_timings().columns) == list(timings.COLUMNS)


def test_record_writes_markdown_and_no_temp_files(results):
    record(StageTiming("index bm25", 2.0))
    record(StageTiming("row a", 8.0, flops=4e11))  # no precision: float32
    files = sorted(p.name for p in results.iterdir())
    assert files == ["timings.csv", "timings.csv.lock", "timings.md"]
    md = (results / "timings.md").read_text()
    assert "best matmul rate of this machine measured in the same run" in md
    assert "| row a | 8.0 | 4e+11 | float32 GEMM | 100 | 4 | 2.0 |" in md
    assert md.rstrip().splitlines()[-1].startswith("| total | 10.0 |")


def test_other_profiles_write_their_own_folder(results):
    record(StageTiming("data nq-mini", 1.0), profile="smoke")
    assert (results / "smoke" / "timings.csv").exists() and not (results / "timings.csv").exists()


def test_summary_has_a_total_line(results):
    record(StageTiming("notebook 04", 12.0))           # ran rows a and b: its wall holds theirs
    record(StageTiming("data nq-mini", 2.0))
    record(StageTiming("row b", 6.0, flops=1e11))   # floor 1 s
    record(StageTiming("row a", 3.0, flops=2e11))   # floor 2 s
    table = timings.summary()
    assert list(table.columns) == ["stage", "wall s", "floor s", "× floor"]
    assert table["stage"].tolist() == ["data nq-mini", "row a", "row b", "notebook 04", "total"]
    assert table.iloc[-1].tolist() == ["total", "14.0", "3", "4.7"]  # data + notebooks; rows are inside them
    assert table.iloc[3].tolist() == ["notebook 04", "12.0", "", ""]


def test_summary_of_an_empty_profile(results):
    assert timings.summary().empty


def test_record_rejects_unknown_precision(results):
    with pytest.raises(ValueError, match="bfloat16"):
        record(StageTiming("row x", 1.0, flops=1e9, precision="bfloat16"))


def test_timed_records_on_success_only(results):
    with timed("index dense", precision="float32", note="minilm") as t:
        t.flops = 1e9
    row = timings.load_timings().iloc[0]
    assert row["stage"] == "index dense" and row["note"] == "minilm" and row["precision"] == "float32"
    assert 0 <= row["wall_s"] < 5 and row["floor_s"] == pytest.approx(0.01)

    with pytest.raises(RuntimeError):
        with timed("row broken") as t:
            raise RuntimeError("boom")
    assert timings.load_timings()["stage"].tolist() == ["index dense"]


def test_measure_peaks_is_positive_and_cached():
    peaks = timings.measure_peaks()
    assert set(peaks) == {"float32_gflops", "int8_gops"}
    assert all(math.isfinite(v) and v > 0 for v in peaks.values())
    assert timings.measure_peaks() is peaks


def test_int8_gemm_is_exact():
    gen = torch.Generator().manual_seed(0)  # values inside b's int8 range (|b| < 4): the comparison is about the path
    a, b = torch.rand(64, 64, generator=gen) * 2 - 1, torch.rand(64, 64, generator=gen) * 2 - 1
    got = timings._int8_gemm(a, b)()
    qa, qb = (torch.clamp(x * 32, -128, 127).to(torch.int8) for x in (a, b))
    if got.dtype == torch.int32:  # torch._int_mm: the integer product itself
        assert torch.equal(got, qa.int() @ qb.int())


def test_int8_gemm_falls_back_to_dynamic_quantized_linear(monkeypatch):
    def unsupported(*args):
        raise RuntimeError("_int_mm: not supported on this backend")

    monkeypatch.setattr(torch, "_int_mm", unsupported)
    gen = torch.Generator().manual_seed(0)  # values inside b's int8 range (|b| < 4): the comparison is about the path
    a, b = torch.rand(64, 64, generator=gen) * 2 - 1, torch.rand(64, 64, generator=gen) * 2 - 1
    got = timings._int8_gemm(a, b)()
    assert got.dtype == torch.float32 and got.shape == (64, 64)
    assert torch.allclose(got, a @ b, atol=0.25)  # b quantised in steps of 1/32, a dynamically
