"""`run_experiment(cfg)`: the stages in order, then the record (run folder, main-table row, timings line)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import PartialState

from rag_lab.config import ExperimentConfig
from rag_lab.data.subsets import eval_set_name
from rag_lab.io import clean_orphans
from rag_lab.paths import REPO_ROOT, cache_dir, profile_results_dir
from rag_lab.reporting.results import table_row, upsert_main_table
from rag_lab.reporting.runs import repair_main_table, write_run_folder
from rag_lab.flops import decoder_flops, training_flops
from rag_lab.reporting.timings import StageTiming, record
from rag_lab.runner.contexts import contexts_stage, trained_query_contexts
from rag_lab.runner.data import check_models, data_stage
from rag_lab.runner.generate import generate_stage
from rag_lab.runner.plan import STAGES
from rag_lab.runner.score import score_stage, summarize_rows
from rag_lab.runner.train import train_stage


@dataclass
class RunResult:
    run_dir: Path
    row: dict
    predictions: list[dict]
    metrics: dict
    timings: dict
    training: dict  # seed -> training report (fine-tuned regimes), else empty


def portable_path(path: Path) -> str:
    """A path as a committed file should name it: relative to the repository when under it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_experiment(cfg: ExperimentConfig, profile: str = "default", show_progress: bool = True,
                   model_path: str | None = None) -> RunResult | None:
    """Run (or reload from the stage caches) one experiment and record it in the main table.

    Fine-tuned regimes train one model per seed in `training.seeds` (or reuse finished ones);
    the row reports the first seed's predictions with bootstrap CIs, and mean ± sd over seeds.
    Launched as several processes (`accelerate launch`, `torchrun`), every process trains and
    only the main one evaluates and returns the result (the others return None).
    """
    t0 = time.perf_counter()
    # what killed runs left half-written: run folders, generation stages, indexes and embeddings, checkpoints, corpora
    for root in (profile_results_dir(profile), *(cache_dir(kind) for kind in ("runs", "retrieval", "train", "corpus"))):
        clean_orphans(root)
    timings, compute = {}, {}  # this run's seconds; the seconds each stage took when it was computed
    stages = STAGES[cfg.regime]
    check_models(cfg, model_path)  # an unknown name fails now, not after minutes of retrieval
    # Under `accelerate launch` (several processes): rank 0 builds the corpus, index and retrieval
    # caches first and the others load them; every rank trains (DDP); rank 0 alone evaluates and records.
    state = PartialState()
    with state.main_process_first():
        data = data_stage(cfg)
        timings["data_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        ctx = contexts_stage(cfg, data, show_progress, profile)
        timings["retrieve_s"] = time.perf_counter() - t

    seeds = cfg.training.seeds if stages.train else [cfg.seed]
    per_seed, training, costs, finals = [], {}, {}, {}
    for seed in seeds if stages.train else []:  # every seed's model first: all ranks take part in training
        t = time.perf_counter()
        final, info = train_stage(cfg, data, seed, show_progress, profile)
        finals[seed] = final
        timings[f"train_seed{seed}_s"] = time.perf_counter() - t
        compute[f"train_seed{seed}_s"] = info.get("train_seconds")
        training[seed] = {"model": portable_path(final),
                          **{k: info.get(k) for k in ("n_train", "n_dev", "skipped_empty_answers", "train_loss", "global_step", "train_seconds", "train_tokens", "peak_rss_gb",
                                                       "best_checkpoint", "checkpoint_rule", "log_history", "dev_history", "objective", "passage_entropy")
                             if k in info}}
        if training[seed].get("best_checkpoint"):  # the run folder is committed: no path of the machine that built it
            training[seed]["best_checkpoint"] = portable_path(Path(training[seed]["best_checkpoint"]))
    if not state.is_main_process:
        return None  # another rank of a multi-process launch: rank 0 evaluates and writes the row
    for seed in seeds:
        path = str(finals[seed]) if stages.train else model_path or cfg.generator.model
        final = finals.get(seed)
        seed_ctx = ctx
        if stages.trains_query_encoder:  # the eval questions retrieved again, with the query encoder this seed trained
            t = time.perf_counter()
            seed_ctx = trained_query_contexts(cfg, data, final, show_progress, profile)
            timings[f"retrieve_seed{seed}_s"] = compute[f"retrieve_seed{seed}_s"] = time.perf_counter() - t
        t, stage = time.perf_counter(), f"generate_seed{seed}_s" if stages.train else "generate_s"
        preds, key, cost = generate_stage(cfg, data, seed_ctx, path, show_progress)
        compute[stage], costs[seed] = cost["generate_s"], cost
        timings[stage] = time.perf_counter() - t
        rows = score_stage(data.questions, preds, seed_ctx)
        per_seed.append((seed, key, rows, summarize_rows(rows, seed=0)))

    _, key, rows, metrics = per_seed[0]
    metrics["seeds"] = seed_summary(per_seed)
    timings["wall_s"] = time.perf_counter() - t0
    # the row's cost is that of computing it, not of a rerun served from the caches
    compute_s = None if None in compute.values() else timings["data_s"] + timings["retrieve_s"] + sum(compute.values())
    run_dir = write_run_folder(cfg, profile, key, rows, metrics, {**timings, "compute_s": compute_s}, training,
                               data.leak_check)
    repair_main_table(profile, pending=run_dir)  # this run's folder gets its row just below: not a problem
    row = table_row(cfg, metrics, eval_set_name(cfg.data, len(data.questions)), compute_s,
                    run_dir.relative_to(profile_results_dir(profile)).as_posix())
    upsert_main_table([row], profile)
    record_row_timing(cfg, compute_s, costs, training, len(data.questions), profile)
    return RunResult(run_dir, row, rows, metrics, timings, training)


def record_row_timing(cfg, compute_s: float | None, costs: dict, training: dict, n: int, profile: str) -> None:
    """The row's line of timings.csv: what computing it took, against the FLOPs it did (generation
    at 2 N per token read or written, training at 6 N per token trained)."""
    if compute_s is None:
        return
    flops, precision = 0.0, "float32"
    for seed, cost in costs.items():
        if cost.get("n_params"):
            flops += decoder_flops(cost["n_params"], cost["prompt_tokens"], cost["new_tokens"])
            precision = cost["precision"] if not training else "float32"  # training is float32 whatever the eval engine
            if seed in training and training[seed].get("train_tokens"):
                flops += training_flops(cost["n_params"], training[seed]["train_tokens"])
    note = f"{n} questions" + (f", {len(training)} training run(s)" if training else "")
    record(StageTiming(f"row {cfg.name}", compute_s, flops or None, precision if flops else None, note), profile)


def seed_summary(per_seed) -> dict:
    """Mean and sample sd over seeds of each metric (all questions)."""
    out = {"seeds": [s for s, *_ in per_seed]}
    for m in ("em", "f1", "match"):
        values = np.array([metrics["all"][m]["mean"] for *_, metrics in per_seed])
        out[m] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                  "values": values.tolist()}
    return out
