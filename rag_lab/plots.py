"""Figures the notebooks show and save to results/figures/ (matplotlib, no seaborn)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt  # headless runs fall back to Agg by themselves

from rag_lab.io import atomic_write_bytes


def recall_curves(evals: dict, ks: Sequence[int] | None = None, subset: bool = False, title: str | None = None):
    """recall@k against k, one line per retriever, shaded 95% bootstrap CI; log-scaled k."""
    from rag_lab.retrieval_eval import recall_curve

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


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save atomically as PNG (the README and notebooks link these files)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
