"""Stage 5, score: the prediction rows of the data contract (what the reader saw counts) and their
means with bootstrap CIs."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rag_lab.data.records import QAExample
from rag_lab.io import DataError
from rag_lab.metrics import AnswerInPassage, bootstrap_ci, score_predictions
from rag_lab.pipeline import Contexts


PREDICTION_EXTRAS = ("prompt_tokens", "truncated", "prompt_sha256")  # copied from the generator's record when it has them


def score_stage(questions: Sequence[QAExample], preds: list[dict], ctx: Contexts | None) -> list[dict]:
    """The prediction rows of the data contract, one per question. What the reader saw is what counts:
    `passage_ids` and `answer_in_passages` cover the passages packed into the prompt (the first
    `n_passages` of the top k: the context budget cuts the rest), `retrieved_ids` and
    `answer_in_retrieved` all k the retriever returned (its recall@k)."""
    scores = score_predictions([p["prediction"] for p in preds], [q.answers for q in questions])
    holds = AnswerInPassage()
    rows = []
    for i, (q, p) in enumerate(zip(questions, preds)):
        row = {"id": q.id, "question": q.question, "answers": list(q.answers), "prediction": p["prediction"],
               "raw": p["raw"], "passage_ids": [], "em": float(scores["em"][i]), "f1": float(scores["f1"][i]),
               "match": float(scores["match"][i]), "answer_in_passages": None, "answer_in_corpus": q.answer_in_corpus}
        if ctx is not None:
            packed = packed_count(p, len(ctx.passages[i]))
            row["passage_ids"] = [h.passage_id for h in ctx.hits[i][:packed]]
            row["answer_in_passages"] = holds.any(q.answers, ctx.passages[i][:packed])
            row["retrieved_ids"] = [h.passage_id for h in ctx.hits[i]]
            row["answer_in_retrieved"] = holds.any(q.answers, ctx.passages[i])
        rows.append({**row, **{k: p[k] for k in PREDICTION_EXTRAS if k in p}})
    return rows


def packed_count(pred: dict, n_retrieved: int) -> int:
    """How many of a question's retrieved passages its reader read: the prompt's `n_passages` (a passage
    cut to fit counts: part of it is in the prompt); readers that read every passage (the extractive
    reader, the readers of fusion.py) read all of them."""
    n = pred.get("n_passages")
    if n is None:
        return n_retrieved
    if not 0 <= n <= n_retrieved:
        raise DataError(f"prediction {pred.get('id')!r} says it read {n} passages of the {n_retrieved} retrieved")
    return int(n)


def summarize_rows(rows: list[dict], seed: int = 0) -> dict:
    """Means with 95% bootstrap CIs, for all questions and the answer-in-corpus subset."""
    out = {}
    subsets = {"all": rows, "in_corpus": [r for r in rows if r["answer_in_corpus"]]}
    for name, subset in subsets.items():
        if not subset:
            continue
        block = {"n": len(subset)}
        metrics = ["em", "f1", "match"] + (["answer_in_passages", "answer_in_retrieved"]
                                           if subset[0]["answer_in_passages"] is not None else [])
        for m in metrics:
            mean, low, high = bootstrap_ci(np.array([float(r[m]) for r in subset]), seed=seed)
            block[m] = {"mean": mean, "low": low, "high": high}
        out[name] = block
    out["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    return out
