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
