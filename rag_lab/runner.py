"""`run_experiment(cfg)`: retrieve -> generate -> score, each stage cached, generation resumable.

Each run leaves `results/runs/<experiment>/<run id>/` (config, predictions, metrics, timings,
versions) and upserts one row of `results/main_table.{csv,md}`. Profiles other than
`default` write under `results/<profile>/` so they never overwrite the committed tables.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rag_lab.config import ExperimentConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.data.subsets import eval_set_name
from rag_lab.io import read_jsonl, write_json, write_jsonl
from rag_lab.metrics import bootstrap_ci, gold_spans, has_answer_normalized, padded_normalized, score_predictions
from rag_lab.paths import REPO_ROOT, profile_results_dir, repo_path
from rag_lab.retrievers.base import Hit, passage_text, stable_hash

MAIN_TABLE_KEY = ("experiment", "eval_set")


@dataclass
class RunResult:
    run_dir: Path
    row: dict
    predictions: list[dict]
    metrics: dict
    timings: dict
    training: dict  # seed -> training report (fine-tuned regimes), else empty


def cache_root() -> Path:
    root = os.environ.get("RAG_LAB_CACHE")
    return Path(root) / "runs" if root else REPO_ROOT / "cache" / "runs"


# ---------------------------------------------------------------- stage 0: data

def load_run_data(cfg: ExperimentConfig) -> tuple[list[QAExample], list[QAExample], list[Passage]]:
    """(eval questions, train questions, passages); passages only when a retriever is configured."""
    from rag_lab.data import load_qa
    from rag_lab.data.subsets import corpus_for, subset_questions

    d = cfg.data
    questions = subset_questions(load_qa(d.dataset, d.eval_split), d.n_eval, d.subset_seed)
    if d.only_answer_in_corpus:  # the oracle row's lens: the questions a perfect retriever could serve
        if any(q.answer_in_corpus is None for q in questions):
            from rag_lab.config import ConfigError

            raise ConfigError(f"data.only_answer_in_corpus: the questions of {d.dataset!r} carry no answer_in_corpus flag "
                              "(nq-mini has it; rag_lab.data.build_nq_mini.mark_answer_in_corpus adds it)")
        questions = [q for q in questions if q.answer_in_corpus]
    needs_train = cfg.generator.n_few_shot > 0 or cfg.training.enabled
    train = load_qa(d.dataset, d.train_split) if needs_train else []
    passages = corpus_for(d, questions) if cfg.retriever.kind != "none" else []
    return questions, train, passages


# ---------------------------------------------------------------- stage 1: retrieve

def retrieve_stage(cfg: ExperimentConfig, questions, passages, show_progress: bool, profile: str = "default") -> list[list[Hit]] | None:
    if cfg.retriever.kind == "none":
        return None
    from rag_lab.data.subsets import corpus_label
    from rag_lab.paths import repo_path
    from rag_lab.retrievers import build_retriever, cached_retrieve
    from rag_lab.timings import record_index_builds

    rcfg = dataclasses.replace(cfg.retriever, encoder=repo_path(cfg.retriever.encoder))
    retriever = build_retriever(rcfg, passages, show_progress=show_progress)
    record_index_builds(retriever, corpus_label(cfg.data), profile)
    return cached_retrieve(retriever, questions, cfg.retriever.k)


# ---------------------------------------------------------------- stage 2: generate (resumable)

def generation_key(cfg: ExperimentConfig, model_id: str, questions, hits) -> str:
    return stable_hash({
        "generator": dataclasses.asdict(cfg.generator), "model": model_id, "seed": cfg.seed,
        "few_shot_pool": [cfg.data.dataset, cfg.data.train_split] if cfg.generator.n_few_shot else None,
        "questions": [[q.id, q.question] for q in questions],
        "passages": None if hits is None else [[h.passage_id for h in row] for row in hits],
    })


def generate_stage(cfg, questions, train, passages, hits, model_path: str, show_progress: bool) -> tuple[list[dict], str, dict]:
    """Predictions in question order, the cache key, and what computing them took: {"generate_s"
    (None if a cache predates that record), "prompt_tokens", "new_tokens", "n_params", "precision"}
    for timings.csv. Finished batches are appended to `partial.jsonl` as they complete, so a killed
    run restarts where it stopped; the batch plan is deterministic."""
    from rag_lab.generators import build_generator
    from rag_lab.models import model_fingerprint, resolve_model
    from rag_lab.pipeline import contexts_from_hits

    key = generation_key(cfg, model_fingerprint(resolve_model(model_path)), questions, hits)
    stage = cache_root() / f"generate-{key[:20]}"
    done_path, partial_path, timing_path = stage / "predictions.jsonl", stage / "partial.jsonl", stage / "timing.json"
    if done_path.exists():
        cost = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.exists() else {"generate_s": None}
        return [row for _, row in read_jsonl(done_path)], key, cost
    generator = build_generator(cfg.generator, train, seed=cfg.seed, model_path=model_path)
    contexts = None if hits is None else contexts_from_hits(hits, passages)
    t0 = time.perf_counter()
    if cfg.generator.kind == "extractive":
        preds = generator.generate(questions, contexts)
        seconds = time.perf_counter() - t0
    else:  # seconds of generation, summed over resumed sessions (loading the model is not counted)
        preds, seconds = _generate_resumable(generator, questions, contexts, partial_path, show_progress)
    cost = {"generate_s": None if seconds is None else round(seconds, 2), **generation_cost(cfg, generator, preds, model_path)}
    write_json(timing_path, cost)
    write_jsonl(done_path, preds)
    partial_path.unlink(missing_ok=True)
    return preds, key, cost


def generation_cost(cfg, generator, preds: list[dict], model_path: str) -> dict:
    """Tokens read and written, the model's parameters and the precision it ran in (timings.csv).
    New tokens are counted by re-tokenising the raw answers, so resumed runs count every batch."""
    from rag_lab.models import resolve_model
    from rag_lab.timings import checkpoint_params

    if cfg.generator.kind == "extractive":
        return {}
    path = Path(resolve_model(repo_path(model_path)))
    int8 = cfg.generator.backend == "ctranslate2" and getattr(generator, "compute_type", "").startswith("int8")
    return {"prompt_tokens": sum(p.get("prompt_tokens", 0) for p in preds),
            "new_tokens": sum(len(generator.tokenizer(p["raw"], add_special_tokens=False)["input_ids"]) for p in preds),
            "n_params": checkpoint_params(path) if path.is_dir() else None, "precision": "int8" if int8 else "float32"}


def _generate_resumable(generator, questions, contexts, partial_path: Path, show_progress: bool) -> tuple[list[dict], float | None]:
    """`generator.generate`, logging each finished batch (with its seconds) to `partial_path` and
    skipping those already logged. Returns the predictions and the seconds all batches took,
    over every resumed session (None if an old log lacks them)."""
    done: dict[int, str] = {}
    seconds: list[float | None] = []
    if partial_path.exists():  # resume: keep every batch that was fully written
        for _, row in read_jsonl(partial_path):
            done.update(zip(row["indices"], row["raw"]))
            seconds.append(row.get("s"))
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    last = time.perf_counter()
    with open(partial_path, "a", encoding="utf-8") as log:
        def on_batch(indices: list[int], raws: list[str]) -> None:
            nonlocal last
            now = time.perf_counter()
            seconds.append(round(now - last, 3))
            log.write(json.dumps({"indices": indices, "raw": raws, "s": seconds[-1]}, ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
            last = now

        preds = generator.generate(questions, contexts, show_progress=show_progress, done=done, on_batch=on_batch)
    return preds, None if None in seconds else sum(seconds)


# ---------------------------------------------------------------- stage 3: score

def score_stage(questions: Sequence[QAExample], preds: list[dict], hits, passages) -> list[dict]:
    """The prediction rows of the data contract, one per question."""
    scores = score_predictions([p["prediction"] for p in preds], [q.answers for q in questions])
    by_id = {p.id: p for p in passages}
    rows = []
    for i, (q, p) in enumerate(zip(questions, preds)):
        ids = [] if hits is None else [h.passage_id for h in hits[i]]
        golds = gold_spans(q.answers)
        in_passages = None if hits is None else any(has_answer_normalized(golds, padded_normalized(passage_text(by_id[pid]))) for pid in ids)
        rows.append({"id": q.id, "question": q.question, "answers": list(q.answers), "prediction": p["prediction"],
                     "raw": p["raw"], "passage_ids": ids, "em": float(scores["em"][i]), "f1": float(scores["f1"][i]),
                     "match": float(scores["match"][i]), "answer_in_passages": in_passages,
                     "answer_in_corpus": q.answer_in_corpus, **{k: p[k] for k in ("prompt_tokens", "truncated") if k in p}})
    return rows


def summarize_rows(rows: list[dict], seed: int = 0) -> dict:
    """Means with 95% bootstrap CIs, for all questions and the answer-in-corpus subset."""
    out = {}
    subsets = {"all": rows, "in_corpus": [r for r in rows if r["answer_in_corpus"]]}
    for name, subset in subsets.items():
        if not subset:
            continue
        block = {"n": len(subset)}
        metrics = ["em", "f1", "match"] + (["answer_in_passages"] if subset[0]["answer_in_passages"] is not None else [])
        for m in metrics:
            mean, low, high = bootstrap_ci(np.array([float(r[m]) for r in subset]), seed=seed)
            block[m] = {"mean": mean, "low": low, "high": high}
        out[name] = block
    out["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    return out


# ---------------------------------------------------------------- the run

def versions() -> dict:
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "rag_lab"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", False
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "rag_lab_git_sha": sha + ("+dirty" if dirty else ""), "platform": platform.platform()}


def run_experiment(cfg: ExperimentConfig, profile: str = "default", show_progress: bool = True, model_path: str | None = None) -> RunResult:
    """Run (or reload from the stage caches) one experiment and record it in the main table.

    Fine-tuned regimes train one model per seed in `training.seeds` (or reuse finished ones);
    the row reports the first seed's predictions with bootstrap CIs, and mean ± sd over seeds.
    """
    t0 = time.perf_counter()
    timings, compute = {}, {}  # this run's seconds; the seconds each stage took when it was computed
    questions, train, passages = load_run_data(cfg)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    hits = retrieve_stage(cfg, questions, passages, show_progress, profile)
    timings["retrieve_s"] = time.perf_counter() - t

    seeds = cfg.training.seeds if cfg.training.enabled else [cfg.seed]
    per_seed, training, costs = [], {}, {}
    for seed in seeds:
        path = model_path or cfg.generator.model
        if cfg.training.enabled:
            t = time.perf_counter()
            final, info = trainer_for(cfg)(cfg, seed, show_progress)
            path = str(final)
            timings[f"train_seed{seed}_s"] = time.perf_counter() - t
            compute[f"train_seed{seed}_s"] = info.get("train_seconds")
            training[seed] = {"model": str(final.relative_to(REPO_ROOT)) if final.is_relative_to(REPO_ROOT) else str(final),
                              **{k: info.get(k) for k in ("n_train", "n_dev", "skipped_empty_answers", "train_loss", "global_step", "train_seconds", "train_tokens", "peak_rss_gb",
                                                           "best_checkpoint", "log_history", "dev_history")}}
        t, stage = time.perf_counter(), f"generate_seed{seed}_s" if cfg.training.enabled else "generate_s"
        preds, key, cost = generate_stage(cfg, questions, train, passages, hits, path, show_progress)
        compute[stage], costs[seed] = cost["generate_s"], cost
        timings[stage] = time.perf_counter() - t
        rows = score_stage(questions, preds, hits, passages)
        per_seed.append((seed, key, rows, summarize_rows(rows, seed=0)))

    _, key, rows, metrics = per_seed[0]
    metrics["seeds"] = seed_summary(per_seed)
    timings["wall_s"] = time.perf_counter() - t0
    # the row's cost is that of computing it, not of a rerun served from the caches
    compute_s = None if None in compute.values() else timings["data_s"] + timings["retrieve_s"] + sum(compute.values())
    run_dir = write_run_folder(cfg, profile, key, rows, metrics, {**timings, "compute_s": compute_s}, training)
    row = table_row(cfg, metrics, eval_set_name(cfg.data, len(questions)), compute_s,
                    run_dir.relative_to(profile_results_dir(profile)).as_posix())
    upsert_main_table([row], profile)
    record_row_timing(cfg, compute_s, costs, training, len(questions), profile)
    return RunResult(run_dir, row, rows, metrics, timings, training)


def record_row_timing(cfg, compute_s: float | None, costs: dict, training: dict, n: int, profile: str) -> None:
    """The row's line of timings.csv: what computing it took, against the FLOPs it did (generation
    at 2 N per token read or written, training at 6 N per token trained)."""
    from rag_lab.timings import StageTiming, decoder_flops, record, training_flops

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


def trainer_for(cfg):
    """The training entry point of a regime: the extractive reader has its own; generators share one."""
    if cfg.regime == "reader":
        from rag_lab.training.reader import ensure_reader_trained

        return ensure_reader_trained
    from rag_lab.training.finetune import ensure_finetuned

    return ensure_finetuned


def seed_summary(per_seed) -> dict:
    """Mean and sample sd over seeds of each metric (all questions)."""
    out = {"seeds": [s for s, *_ in per_seed]}
    for m in ("em", "f1", "match"):
        values = np.array([metrics["all"][m]["mean"] for *_, metrics in per_seed])
        out[m] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                  "values": values.tolist()}
    return out


def write_run_folder(cfg, profile: str, key: str, rows, metrics, timings, training: dict | None = None) -> Path:
    run_dir = profile_results_dir(profile) / "runs" / cfg.name / key[:12]
    if training:
        write_json(run_dir / "training.json", training)
    write_json(run_dir / "config.json", {"profile": profile, **cfg.to_dict()})
    write_jsonl(run_dir / "predictions.jsonl", rows)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "timings.json", {k: None if v is None else round(v, 2) for k, v in timings.items()})
    write_json(run_dir / "versions.json", versions())
    return run_dir


def table_row(cfg: ExperimentConfig, metrics: dict, eval_set: str, wall_s: float | None, run: str) -> dict:
    """One row of results/main_table.csv; `wall_s` is the time computing the row took (stages reused
    from a cache count what they took when computed; None if unknown); `run` is the run folder
    relative to the profile's results folder."""
    r = cfg.retriever
    row = {"block": cfg.block, "experiment": cfg.name, "regime": cfg.regime, "generator": Path(cfg.generator.model).name,
           "backend": cfg.generator.backend if cfg.generator.kind == "decoder" else "",
           "retriever": r.kind if r.kind != "none" else "", "k": r.k if r.kind != "none" else "",
           "context": context_label(cfg) if r.kind != "none" else "",
           "eval_set": eval_set, "n": metrics["all"]["n"]}
    for subset, suffix in (("all", ""), ("in_corpus", "_in_corpus")):
        block = metrics.get(subset)
        if block is None:
            continue
        if suffix:
            row["n_in_corpus"] = block["n"]
        for m in ("em", "f1", "match", "answer_in_passages"):
            if m in block:
                col = ("recall@k" if m == "answer_in_passages" else m) + suffix
                row[col], row[col + "_low"], row[col + "_high"] = block[m]["mean"], block[m]["low"], block[m]["high"]
    seeds = metrics["seeds"]
    if cfg.training.enabled:  # variation over training seeds only means something for trained rows
        for m in ("em", "f1", "match"):
            row[f"{m}_seed_mean"], row[f"{m}_seed_sd"] = seeds[m]["mean"], seeds[m]["sd"]
    row.update({"truncated": metrics["truncated"], "wall_s": None if wall_s is None else round(wall_s, 1), "seeds": " ".join(map(str, seeds["seeds"])),
                "run": run})
    return row


def context_label(cfg: ExperimentConfig) -> str:
    """What the reader was given to read: passage granularity and the context budget."""
    passages = f"windows<={cfg.data.window_words}w" if cfg.data.window_words else "passages<=100w"
    budget = cfg.generator.max_context_tokens
    return passages + (f", {budget} tokens" if budget else "")


def display_main_table(table: pd.DataFrame) -> pd.DataFrame:
    """'mean [low, high]' cells for reading; the CSV keeps the numbers."""
    from rag_lab.results import ci_column

    def ci(col):
        return ci_column(table, col)

    columns = [c for c in ("block", "experiment", "regime", "generator", "backend", "retriever", "k", "context", "eval_set", "n") if c in table]
    out = table[columns].fillna("").copy()
    for col, label in (("em", "EM"), ("f1", "F1"), ("match", "answer match"), ("recall@k", "answer recall@k")):
        out[label] = ci(col)
    out["n (in corpus)"] = table["n_in_corpus"] if "n_in_corpus" in table else ""
    for col, label in (("em_in_corpus", "EM (in corpus)"), ("f1_in_corpus", "F1 (in corpus)"),
                       ("match_in_corpus", "match (in corpus)"), ("recall@k_in_corpus", "recall@k (in corpus)")):
        out[label] = ci(col)
    out["seeds"] = table["seeds"].astype(str) if "seeds" in table else ""
    if "em_seed_mean" in table:
        trained = table["regime"].str.endswith("_ft") | (table["regime"] == "reader")
        out["EM mean ± sd over seeds"] = [
            f"{m:.3f} ± {s:.3f}" if t and not pd.isna(m) else ""
            for m, s, t in zip(table["em_seed_mean"], table["em_seed_sd"], trained)]
    out["wall s"] = ["" if pd.isna(w) else f"{w:.0f}" for w in table["wall_s"]]
    return out


def upsert_main_table(rows: list[dict], profile: str = "default") -> pd.DataFrame:
    """Insert/replace rows of results/main_table.csv and re-render main_table.md (no rows: re-render only)."""
    from rag_lab.results import upsert_rows

    return upsert_rows(profile_results_dir(profile) / "main_table.csv", rows, key=MAIN_TABLE_KEY,
                       title="Main results: every regime on the same eval set",
                       note=("One row per experiment, produced by `rag-lab run experiments/<experiment>.yaml` "
                             "(or the notebooks). EM / F1 / answer match with 95% bootstrap CIs (1,000 resamples); "
                             "answer recall@k = a gold answer occurs in the k passages the reader saw; 'in corpus' = "
                             "questions whose answer occurs somewhere in the corpus. Greedy decoding."),
                       render=display_main_table, order=in_regime_order)


REGIME_ORDER = ("closed_book", "closed_book_ft", "rag", "rag_ft", "reader", "oracle")  # the order of the comparison


def in_regime_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by block, then in the order the comparison reads: closed-book, fine-tuned, RAG, RAG
    fine-tuned, reader, oracle; within a regime by experiment name, numbers compared as numbers (k1, k3, k5, k10)."""
    import re

    def key(row) -> tuple:
        regime = REGIME_ORDER.index(row["regime"]) if row["regime"] in REGIME_ORDER else len(REGIME_ORDER)
        name = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(row["experiment"])) if t)
        block = row["block"] if "block" in row and isinstance(row["block"], str) else ""
        return block, regime, name

    return table.iloc[sorted(range(len(table)), key=lambda i: key(table.iloc[i]))]
