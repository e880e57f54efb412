"""How far each stage of `make reproduce` is from the hardware limit.

Every stage (data, each index build, each table row, each notebook) upserts one row of
`results/timings.csv` (`results/<profile>/timings.csv` for other profiles): its wall seconds,
the model FLOPs it did, and the *floor*, the seconds those FLOPs would take at the best matmul
rate this machine reached in the same process (float32 GEMM for float32 stages, int8 GEMM for
int8 stages). `× floor = wall / floor` says how much of the time is not arithmetic: data
movement, Python, tokenisation, small batches. Measuring the peak in the same run, not quoting
a datasheet, keeps the ratio honest on a shared or throttled machine.
"""
from __future__ import annotations

import functools
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from rag_lab.paths import profile_results_dir
from rag_lab.results import load_table, upsert_rows

PRECISIONS = ("float32", "int8")
PEAK_KEYS = {"float32": "float32_gflops", "int8": "int8_gops"}
COLUMNS = ("stage", "wall_s", "flops", "precision", "peak", "floor_s", "of_floor", "float32_gflops", "int8_gops", "note")
DETAILED = ("stage", "wall s", "model FLOPs", "reference", "peak G/s", "floor s", "× floor", "note")  # timings.md
SUMMARY = ("stage", "wall s", "floor s", "× floor")  # the README
STAGE_ORDER = ("data", "index", "row", "notebook")  # the order `make reproduce` runs them
GEMM_N = 2048  # 17 GFLOP per product: long enough to time, short enough (< 1 s each) to measure every run

TITLE = "Timings: every stage of `make reproduce` against this machine's matmul peak"
NOTE = ("floor = model FLOPs / the best matmul rate of this machine measured in the same run (float32 GEMM for "
        "float32 stages, int8 GEMM for int8 stages); × floor = wall / floor. Model FLOPs count 2 N per token "
        "forward and 6 N per token trained (N = parameters without the input embeddings), ignoring attention "
        "over the context. Stages without model FLOPs have no floor. The total's floor is the sum of the floors.")


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


# --- recording --------------------------------------------------------------------------------------------

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
