"""How far each stage of `make reproduce` is from the hardware limit.

Every stage (data, each index build, each table row, each notebook) upserts one row of
`results/timings.csv` (`results/<profile>/timings.csv` for other profiles): its wall seconds,
the model FLOPs it did, and the *floor*, the seconds those FLOPs would take at the best matmul
rate this machine reached in the same process (float32 GEMM for float32 stages, int8 GEMM for
int8 stages). `× floor = wall / floor` says how much of the time is not arithmetic: data
movement, Python, tokenisation, small batches. Measuring the peak in the same run, not quoting
a datasheet, keeps the ratio honest on a shared or throttled machine. The peak and the FLOP counts
are `rag_lab.flops`'s, shared with benchmarks/.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pandas as pd

from rag_lab.flops import measure_peaks
from rag_lab.paths import profile_results_dir
from rag_lab.reporting.results import load_table, upsert_rows

PRECISIONS = ("float32", "int8")
PEAK_KEYS = {"float32": "float32_gflops", "int8": "int8_gops"}
COLUMNS = ("stage", "wall_s", "flops", "precision", "peak", "floor_s", "of_floor", "float32_gflops", "int8_gops", "note")
DETAILED = ("stage", "wall s", "model FLOPs", "reference", "peak G/s", "floor s", "× floor", "note")  # timings.md
SUMMARY = ("stage", "wall s", "floor s", "× floor")  # the README
STAGE_ORDER = ("data", "index", "row", "notebook")  # the order `make reproduce` runs them

TITLE = "Timings: every stage of `make reproduce` against this machine's matmul peak"
NOTE = ("floor = model FLOPs / the best matmul rate of this machine measured in the same run (float32 GEMM for "
        "float32 stages, int8 GEMM for int8 stages); × floor = wall / floor. Model FLOPs count 2 N per token "
        "forward and 6 N per token trained (N = parameters without the input embeddings), ignoring attention "
        "over the context. Stages without model FLOPs have no floor. The total's floor is the sum of the floors.")


# --- recording --------------------------------------------------------------------------------------------

def record_index_builds(retriever, corpus: str, profile: str = "default") -> list[dict]:
    """A row per index this retriever built in this process (none when every part came from the
    cache): `retriever.build` is {"kind", "seconds", "flops"} or None; hybrids have `parts`."""
    rows = []
    for part in getattr(retriever, "parts", (retriever,)):
        build = getattr(part, "build", None)
        if build:
            rows.append(record(StageTiming(f"index {build['kind']} {corpus}", build["seconds"], build.get("flops"),
                                           build.get("precision", "float32") if build.get("flops") else None,
                                           build.get("note", "")), profile))
    return rows


@dataclass
class StageTiming:
    stage: str            # e.g. "index dense all-minilm-l6-v2", "row rag_zero_shot_qwen", "notebook 04_rag_zero_shot"
    wall_s: float
    flops: float | None = None     # model FLOPs done (None: not a compute stage)
    precision: str | None = None   # "float32" | "int8": which peak is the floor's reference
    note: str = ""


def timings_path(profile: str = "default"):
    return profile_results_dir(profile) / "timings.csv"


def record(timing: StageTiming, profile: str = "default") -> dict:
    """Upsert one row (key: stage) of the profile's timings.csv and re-render timings.md. Both peaks go
    in every row, so each says what the machine measured in the run that wrote it. A compute stage
    without a precision is taken as float32 (torch's CPU default); one without FLOPs has no floor."""
    peaks = measure_peaks()
    nan = float("nan")
    row = {"stage": timing.stage, "wall_s": float(timing.wall_s), "flops": nan, "precision": timing.precision,
           "peak": nan, "floor_s": nan, "of_floor": nan,
           "float32_gflops": peaks["float32_gflops"], "int8_gops": peaks["int8_gops"], "note": timing.note}
    if timing.flops is not None:
        precision = timing.precision or "float32"
        if precision not in PRECISIONS:
            raise ValueError(f"stage {timing.stage!r}: precision {precision!r} is not one of {PRECISIONS}")
        peak = peaks[PEAK_KEYS[precision]]
        floor = float(timing.flops) / (peak * 1e9)
        row.update(flops=float(timing.flops), precision=precision, peak=peak, floor_s=floor,
                   of_floor=row["wall_s"] / floor if floor > 0 else nan)
    upsert_rows(timings_path(profile), [row], key=("stage",), title=TITLE, note=NOTE,
                render=_display, order=in_stage_order)
    return row


@contextmanager
def timed(stage: str, profile: str = "default", precision: str | None = None, note: str = "") -> Iterator[StageTiming]:
    """`with timed("index bm25", profile) as t: ...; t.flops = ...`: records the stage's wall time on
    a normal exit only, so a failed stage never leaves a time that looks like a finished one."""
    timing = StageTiming(stage, 0.0, precision=precision, note=note)
    start = time.perf_counter()
    yield timing
    timing.wall_s = time.perf_counter() - start
    record(timing, profile)


def load_timings(profile: str = "default") -> pd.DataFrame:
    """The numeric table (empty, with the columns, before any stage is recorded)."""
    path = timings_path(profile)
    return load_table(path) if path.exists() else pd.DataFrame(columns=list(COLUMNS))


# --- reading ----------------------------------------------------------------------------------------------

def in_stage_order(table: pd.DataFrame) -> pd.DataFrame:
    """Data, indexes, rows, notebooks, then anything else; by name within each (numbers as numbers), so
    the table reads the same whatever order parallel runs finished in."""
    def key(stage) -> tuple:
        kind = str(stage).split(" ", 1)[0]
        rank = STAGE_ORDER.index(kind) if kind in STAGE_ORDER else len(STAGE_ORDER)
        return rank, tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(stage)) if t)

    return table.iloc[sorted(range(len(table)), key=lambda i: key(table["stage"].iloc[i]))]


def summary(profile: str = "default") -> pd.DataFrame:
    """The README's table (formatted strings): stage, wall s, floor s, × floor, and a total line. A
    notebook's wall includes its rows and indexes, so the total's wall adds the stages that do not
    nest (data and notebooks: what `make reproduce` spent after set-up) and its floor adds the
    compute stages; its × floor is how far the reproduction is from doing nothing but arithmetic."""
    return _display(load_timings(profile), detailed=False)


def _display(table: pd.DataFrame, detailed: bool = True) -> pd.DataFrame:
    rows = [_display_row(r.stage, r.wall_s, r.floor_s, r.flops, r.precision, r.peak, r.note, detailed)
            for r in in_stage_order(table).itertuples(index=False)]
    if len(table):
        kinds = table["stage"].astype(str).str.split(" ").str[0]
        outer = table[kinds.isin(("data", "notebook"))]
        wall = float((outer if len(outer) else table)["wall_s"].sum())
        floor = float(table["floor_s"].sum(min_count=1))
        flops = float(table["flops"].sum(min_count=1))
        rows.append(_display_row("total", wall, floor, flops, None, None, "", detailed))
    return pd.DataFrame(rows, columns=list(DETAILED if detailed else SUMMARY))


def _display_row(stage, wall, floor, flops, precision, peak, note, detailed: bool) -> list[str]:
    ratio = wall / floor if _number(floor) and floor > 0 else None
    cells = {"stage": stage, "wall s": f"{wall:.1f}", "floor s": f"{floor:.3g}" if _number(floor) else "",
             "× floor": "" if ratio is None else (f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.1f}"),
             "model FLOPs": f"{flops:.3g}" if _number(flops) else "",
             "reference": "" if not _number(flops) or not isinstance(precision, str) else f"{precision} GEMM",
             "peak G/s": f"{peak:.0f}" if _number(peak) else "", "note": note if isinstance(note, str) else ""}
    return [cells[k] for k in (DETAILED if detailed else SUMMARY)]


def _number(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
