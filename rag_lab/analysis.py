"""Reading results: example predictions, k sweeps, paired comparisons, error attribution.

Everything here works on the files the runner wrote (predictions.jsonl rows, table rows),
so notebooks only call these functions and plot.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import pandas as pd


def pick_examples(predictions: Sequence[dict], n: int = 5, correct: bool = True, seed: int = 0) -> pd.DataFrame:
    """n predictions that are right (answer match) or wrong, seeded, as a small table."""
    pool = [r for r in predictions if bool(r["match"]) == correct]
    chosen = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    cols = ["id", "question", "answers", "prediction", "raw", "em", "f1", "match", "answer_in_passages"]
    return pd.DataFrame([{c: pool[i].get(c) for c in cols} for i in chosen], columns=cols)


def k_sweep(cfg, ks: Sequence[int], profile: str = "default", show_progress: bool = True) -> pd.DataFrame:
    """Run `cfg` once per k (experiment names `<name>_k<k>`); one row per k with EM/F1/match/recall and CIs."""
    from rag_lab.runner import run_experiment

    rows = []
    for k in ks:
        run_cfg = dataclasses.replace(cfg, name=f"{cfg.name}_k{k}", retriever=dataclasses.replace(cfg.retriever, k=k))
        rows.append(run_experiment(run_cfg, profile=profile, show_progress=show_progress).row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- reading the runner's files

def load_predictions(run: str, profile: str = "default") -> list[dict]:
    """The predictions.jsonl of a table row's run folder (the `run` column)."""
    from rag_lab.io import read_jsonl
    from rag_lab.paths import profile_results_dir

    return [row for _, row in read_jsonl(profile_results_dir(profile) / run / "predictions.jsonl")]


def load_results(profile: str = "default", eval_set: str | None = None) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """The main table (rows of one eval set: the largest one unless named) and each row's predictions."""
    from rag_lab.paths import profile_results_dir
    from rag_lab.results import load_table

    table = load_table(profile_results_dir(profile) / "main_table.csv")
    if eval_set is None:
        eval_set = table.groupby("eval_set")["experiment"].count().idxmax()
    table = table[table["eval_set"] == eval_set].reset_index(drop=True)
    return table, {row.experiment: load_predictions(row.run, profile) for row in table.itertuples()}


def _aligned(a: Sequence[dict], b: Sequence[dict], metric: str):
    """Per-question arrays of two systems; refuses rows that are not the same questions in the same order."""
    import numpy as np

    ids_a, ids_b = [r["id"] for r in a], [r["id"] for r in b]
    if ids_a != ids_b:
        raise ValueError(f"cannot pair systems evaluated on different questions ({len(ids_a)} vs {len(ids_b)} ids, "
                         f"{len(set(ids_a) ^ set(ids_b))} not shared): compare rows of the same eval set only")
    return np.array([float(r[metric]) for r in a]), np.array([float(r[metric]) for r in b])


def paired_tests(predictions: dict[str, list[dict]], pairs: Sequence[tuple[str, str]], metrics=("em", "match", "f1"),
                 seed: int = 0) -> pd.DataFrame:
    """For each (baseline, system) pair and metric: the mean difference with its paired-bootstrap 95% CI and
    p-value, and (for 0/1 metrics) the exact McNemar p-value."""
    from rag_lab.metrics import mcnemar_exact, paired_bootstrap_test

    rows = []
    for base, system in pairs:
        if base not in predictions or system not in predictions:
            continue
        for m in metrics:
            a, b = _aligned(predictions[base], predictions[system], m)
            test = paired_bootstrap_test(b, a, seed=seed)
            row = {"baseline": base, "system": system, "metric": m, "n": len(a), "baseline_mean": a.mean(),
                   "system_mean": b.mean(), "diff": test["diff"], "diff_low": test["ci_low"], "diff_high": test["ci_high"],
                   "p_bootstrap": test["p_value"]}
            row["p_mcnemar"] = mcnemar_exact(b, a)["p_value"] if m != "f1" else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


ATTRIBUTION = ("correct", "correct, answer not in passages", "reader miss", "retrieval miss")


def error_attribution(rag_predictions: Sequence[dict], closed_book: Sequence[dict] | None = None,
                      metric: str = "match") -> dict:
    """Where does a RAG system fail? Each question is one of
    - correct: right, and a retrieved passage holds the answer;
    - correct, answer not in passages: right anyway (parametric knowledge, or luck);
    - reader miss: a passage holds the answer, the reader got it wrong;
    - retrieval miss: no passage holds it, and the answer is wrong.
    With `closed_book` (same questions), also how many were already right without retrieval."""
    counts = dict.fromkeys(ATTRIBUTION, 0)
    for r in rag_predictions:
        right, found = bool(r[metric]), bool(r["answer_in_passages"])
        counts[ATTRIBUTION[0] if right and found else ATTRIBUTION[1] if right else ATTRIBUTION[2] if found else ATTRIBUTION[3]] += 1
    out = {"n": len(rag_predictions), "metric": metric, **counts}
    if closed_book is not None:
        cb, rag = _aligned(closed_book, rag_predictions, metric)
        out["right closed-book"] = int(cb.sum())
        out["right closed-book and with RAG"] = int((cb * rag).sum())
        out["right closed-book, lost with RAG"] = int((cb * (1 - rag)).sum())
        out["gained with RAG"] = int(((1 - cb) * rag).sum())
    return out


def attribution_table(table: pd.DataFrame, predictions: dict[str, list[dict]], closed_book: str | None = None,
                      metric: str = "match") -> pd.DataFrame:
    """error_attribution for every row that used retrieval."""
    rows = []
    cb = predictions.get(closed_book) if closed_book else None
    for row in table.itertuples():
        preds = predictions[row.experiment]
        if preds and preds[0]["answer_in_passages"] is not None:
            rows.append({"experiment": row.experiment, "regime": row.regime, **error_attribution(preds, cb, metric)})
    return pd.DataFrame(rows)


def disagreements(a: Sequence[dict], b: Sequence[dict], metric: str = "match", names=("A", "B")) -> pd.DataFrame:
    """Questions where exactly one of two systems is right (same questions required)."""
    x, y = _aligned(a, b, metric)
    rows = []
    for ra, rb, va, vb in zip(a, b, x, y):
        if va != vb:
            rows.append({"id": ra["id"], "question": ra["question"], "answers": ra["answers"],
                         f"{names[0]} prediction": ra["prediction"], f"{names[1]} prediction": rb["prediction"],
                         "right": names[0] if va > vb else names[1],
                         "answer_in_passages": rb.get("answer_in_passages")})
    return pd.DataFrame(rows)


def adjacent_pairs(experiments: Sequence[str]) -> list[tuple[str, str]]:
    """The comparisons the table is about, among the experiments present."""
    wanted = [("closed_book_zero_shot", "finetune_closed_book"), ("closed_book_zero_shot", "rag_zero_shot_bm25"),
              ("closed_book_zero_shot", "rag_zero_shot_dense"), ("closed_book_zero_shot", "rag_zero_shot_hybrid"),
              ("rag_zero_shot_bm25", "rag_zero_shot_hybrid"), ("rag_zero_shot_dense", "rag_zero_shot_hybrid"),
              ("rag_zero_shot_dense", "finetune_rag"), ("finetune_closed_book", "finetune_rag"),
              ("finetune_rag", "reader_extractive")]
    present = set(experiments)
    return [(a, b) for a, b in wanted if a in present and b in present]
