"""rag_lab.reporting.timings: the timings table (the peaks and FLOP counts are tests/test_flops.py's)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from rag_lab.reporting import timings
from rag_lab.reporting.timings import StageTiming, record, timed

PEAKS = {"float32_gflops": 100.0, "int8_gops": 400.0}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A private results folder and fixed peaks, so floors are exact."""
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(timings, "measure_peaks", lambda repeats=3: dict(PEAKS))
    return tmp_path / "results"


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
