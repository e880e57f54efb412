"""Figures the notebooks show and save to results/figures/ (matplotlib, no seaborn)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt  # headless runs fall back to Agg by themselves
import numpy as np

from rag_lab.studies.analysis import ATTRIBUTION
from rag_lab.studies.budget import curves_table
from rag_lab.io import atomic_write_bytes
from rag_lab.studies.retrieval_eval import recall_curve


def recall_curves(evals: dict, ks: Sequence[int] | None = None, subset: bool = False, title: str | None = None):
    """recall@k against k, one line per retriever, shaded 95% bootstrap CI; log-scaled k."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, ev in evals.items():
        curve = recall_curve(ev, ks, subset=subset)
        ax.plot(curve["k"], curve["recall"], label=name, lw=1.8)
        ax.fill_between(curve["k"], curve["low"], curve["high"], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("answer recall@k")
    any_ev = next(iter(evals.values()))
    n = int(any_ev.in_corpus.sum()) if subset else len(any_ev.question_ids)
    ax.set_title(title or f"Answer recall@k, {'answer-in-corpus subset' if subset else 'all questions'} (n={n})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def recall_at_budget(curves, choose_at: int | None = None, title: str = ""):
    """Answer recall against the context budget (reader tokens), one line per (retriever,
    granularity), 95% CI bands; a dotted line at the budget the default rows use."""
    table = curves_table(curves)
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for setting, g in table.groupby("setting", sort=False):
        style = "--" if "windows" in setting else "-"
        ax.plot(g["budget"], g["recall"], style, marker="o", ms=3, label=setting)
        ax.fill_between(g["budget"], g["recall_low"], g["recall_high"], alpha=0.12)
    if choose_at:
        ax.axvline(choose_at, color="grey", ls=":", lw=1)
    ax.set_xlabel("context budget (reader tokens)")
    ax.set_ylabel("answer recall in the context")
    ax.set_title(title or f"Answer recall per prompt token (n={int(table['n'].iloc[0])} dev questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save atomically as PNG (the README and notebooks link these files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


METRIC_LABELS = {"em": "EM", "f1": "F1", "match": "answer match", "recall@k": "answer recall@k"}


def metrics_vs_k(rows, metrics: Sequence[str] = ("em", "f1", "match", "recall@k"), title: str = ""):
    """EM, F1, answer match (and answer recall) against k, with 95% CI bands (rows from analysis.k_sweep)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = rows.sort_values("k")
    for m in metrics:
        ax.plot(rows["k"], rows[m], marker="o", label=METRIC_LABELS.get(m, m))
        ax.fill_between(rows["k"].astype(float), rows[m + "_low"].astype(float), rows[m + "_high"].astype(float), alpha=0.15)
    ax.set_xlabel("k (passages in the prompt)")
    ax.set_ylabel("score")
    ax.set_xticks(list(rows["k"]))
    ax.set_title(title or f"Zero-shot RAG against k (n={int(rows['n'].iloc[0])})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def metric_bars(table, metrics: Sequence[str] = ("em", "f1", "match"), label_col: str = "experiment", title: str = ""):
    """Grouped bars of metrics per row of a results table, with 95% CI error bars."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(table) + 2), 4.2))
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        mean = table[m].astype(float).to_numpy()
        err = np.vstack([mean - table[m + "_low"].astype(float), table[m + "_high"].astype(float) - mean])
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=METRIC_LABELS.get(m, m))
    ax.set_xticks(x, table[label_col], rotation=20, ha="right")
    ax.set_ylabel("score (95% bootstrap CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return fig


def learning_curves(training: dict, title: str = ""):
    """Train loss and dev EM against optimiser steps, one line per seed (from RunResult.training)."""
    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed, info in training.items():
        history = info.get("log_history") or []
        steps = [h["step"] for h in history if "loss" in h]
        ax_loss.plot(steps, [h["loss"] for h in history if "loss" in h], label=f"train loss, seed {seed}")
        evals = [h for h in history if "eval_loss" in h]
        if evals:
            ax_loss.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "--", label=f"dev loss, seed {seed}")
        dev = info.get("dev_history") or []
        ax_em.plot([d["step"] for d in dev], [d["dev_em"] for d in dev], marker="o", label=f"dev EM, seed {seed}")
        ax_em.plot([d["step"] for d in dev], [d["dev_f1"] for d in dev], marker=".", ls=":", label=f"dev F1, seed {seed}")
    ax_loss.set_xlabel("optimiser step"); ax_loss.set_ylabel("loss (answer tokens)"); ax_loss.grid(alpha=0.3); ax_loss.legend()
    ax_em.set_xlabel("optimiser step"); ax_em.set_ylabel("dev score (held out from train)"); ax_em.grid(alpha=0.3); ax_em.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def passage_entropy(training: dict[str, dict], k: int, title: str = "Passage-weight entropy during end-to-end training"):
    """Entropy of p_eta(z|x) over the top-k against training steps, one line per run (training.json, seed 0),
    with log k (uniform weights) for reference."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, info in training.items():
        curve = info["0"].get("passage_entropy") or []
        ax.plot([c["step"] for c in curve], [c["passage_entropy"] for c in curve], marker="o", label=name)
    ax.axhline(np.log(k), color="grey", linestyle="--", label=f"uniform over the top-{k} (log k)")
    ax.set_xlabel("training step"); ax.set_ylabel("entropy of p_eta(z|x), nats"); ax.set_ylim(bottom=0); ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def recall_vs_em(table, metric: str = "em", title: str = ""):
    """How often the answer was in the passages a reader saw (packed into its prompt) against its score,
    one point per RAG row (95% CIs both ways)."""
    col = "in_prompt"
    rag = table[table[col].notna()] if col in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for rd in rag.to_dict("records"):
        r, m = rd[col], rd[metric]
        ax.errorbar(r, m, xerr=[[r - rd[f"{col}_low"]], [rd[f"{col}_high"] - r]],
                    yerr=[[m - rd[f"{metric}_low"]], [rd[f"{metric}_high"] - m]], fmt="o", capsize=3, label=rd["experiment"])
    lim = max([0.05] + list(rag.get(f"{col}_high", [])))
    ax.plot([0, lim], [0, lim], ls=":", color="grey", label="score = answer in prompt")
    ax.set_xlabel("answer in the passages packed into the prompt")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"Retrieval ceiling vs reader {METRIC_LABELS.get(metric, metric)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attribution_bars(attribution, title: str = ""):
    """Stacked bars: correct / parametric (right without the answer in the prompt) / reader miss / packed out
    (retrieved, cut by the context budget) / retrieval miss."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(attribution) + 2), 4.2))
    bottom = [0.0] * len(attribution)
    colors = ["#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51"]
    for cat, color in zip(ATTRIBUTION, colors):
        frac = (attribution[cat] / attribution["n"]).tolist()
        ax.bar(attribution["experiment"], frac, bottom=bottom, label=cat, color=color)
        bottom = [b + f for b, f in zip(bottom, frac)]
    ax.set_ylabel(f"fraction of questions (correct = {attribution['metric'].iloc[0]})")
    ax.set_title(title or "Error attribution of the RAG rows")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def histogram(values, bins: int = 40, xlabel: str = "", title: str = ""):
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.hist(values, bins=bins, color="#457b9d")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
