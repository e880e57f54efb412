"""Answer recall per prompt token: which retriever and passage size put a gold answer in front
of the reader for the fewest prompt tokens.

On a CPU, prefill is compute-bound and dominates a RAG prompt's cost, so the currency of a RAG
setting is prompt tokens, not k. For each question the top-ranked passages are packed into a
context budget of B reader tokens exactly as `PromptBuilder` packs them (whole passages while
they fit, the next one cut), and we ask whether that context holds a gold answer. Measured on
a dev split drawn from the training questions: the choice is never tuned on the eval split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.prompts import PromptBuilder
from rag_lab.metrics import bootstrap_ci, has_answer, mcnemar_exact


def context_recall(questions: Sequence[QAExample], contexts: Sequence[Sequence[Passage]], builder: PromptBuilder,
                   budget: int) -> np.ndarray:
    """(n,) bool: the context the reader would see within `budget` tokens holds a gold answer."""
    found = np.zeros(len(questions), dtype=bool)
    for i, (q, passages) in enumerate(zip(questions, contexts)):
        context, _, _ = builder._fit(passages, budget)
        found[i] = has_answer(q.answers, context)
    return found


@dataclass
class BudgetCurve:
    """Recall at each budget for one (retriever, passage granularity) setting."""

    retriever: str
    granularity: str  # "passages" (the corpus's own) or "windows<=40w"
    found: dict[int, np.ndarray]  # budget -> (n,) bool

    def rows(self, seed: int = 0) -> list[dict]:
        out = []
        for budget, values in sorted(self.found.items()):
            mean, low, high = bootstrap_ci(values.astype(float), seed=seed)
            out.append({"retriever": self.retriever, "granularity": self.granularity, "setting": self.setting,
                        "budget": budget, "n": len(values), "recall": mean, "recall_low": low, "recall_high": high})
        return out

    @property
    def setting(self) -> str:
        return f"{self.retriever}, {self.granularity}"


def budget_curve(retriever: str, granularity: str, questions, contexts, builder: PromptBuilder,
                 budgets: Sequence[int]) -> BudgetCurve:
    return BudgetCurve(retriever, granularity, {b: context_recall(questions, contexts, builder, b) for b in budgets})


def curves_table(curves: Sequence[BudgetCurve]) -> pd.DataFrame:
    return pd.DataFrame([row for c in curves for row in c.rows()])


def choose_setting(curves: Sequence[BudgetCurve], budget: int) -> tuple[BudgetCurve, pd.DataFrame]:
    """The setting with the highest recall at `budget`, and every setting's recall there, best
    first, with the paired difference to the best (exact McNemar p: same dev questions)."""
    ranked = sorted(curves, key=lambda c: (-c.found[budget].mean(), c.setting))
    best = ranked[0]
    rows = []
    for c in ranked:
        a, b = best.found[budget], c.found[budget]
        rows.append({"setting": c.setting, "budget": budget, "recall": float(b.mean()),
                     "vs best": float(b.mean() - a.mean()),
                     "McNemar p vs best": np.nan if c is best else mcnemar_exact(a.astype(float), b.astype(float))["p_value"]})
    return best, pd.DataFrame(rows)
