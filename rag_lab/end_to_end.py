"""What end-to-end training did to the retriever (notebook 07): answer recall@k of the query encoders
trained through the reader against the one they started from, on the whole eval split, over the
same fixed passage embeddings; paired tests on the same questions; the questions whose top-1 changed.

    study = query_encoder_study(base_cfg, {"rag_sequence": final_dir, ...}, profile)
    study.table        # rows of results/retrieval.* (beside notebook 01's retrievers)
    study.tests        # recall@k differences vs the starting encoder, paired bootstrap + McNemar
    examples, counts = top1_changes(frozen_predictions, e2e_predictions, corpus)   # the top-1 that changed
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rag_lab.config import DataConfig, ExperimentConfig
from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.data.subsets import corpus_label, eval_set_name
from rag_lab.metrics import AnswerInPassage, mcnemar_exact, paired_bootstrap_test
from rag_lab.paths import profile_results_dir
from rag_lab.pipeline import Contexts, contexts
from rag_lab.results import KS, display_retrieval_table, upsert_rows
from rag_lab.retrieval_eval import (RETRIEVAL_NOTE, RETRIEVAL_TITLE, RetrievalEval, describe, evaluate_contexts, load_study_data,
                                   recall_row)
from rag_lab.training import QUERY_ENCODER

RECALL_TESTS = "end_to_end_recall"  # results/<this>.{csv,md}: the paired tests of the study


@dataclass
class QueryEncoderStudy:
    table: pd.DataFrame  # this study's rows of results/retrieval.csv
    tests: pd.DataFrame  # recall@k of each trained encoder minus the starting one, paired
    evals: dict[str, RetrievalEval]
    contexts: dict[str, Contexts]
    questions: list[QAExample]


def query_encoder_study(cfg: ExperimentConfig, trained: dict[str, Path], profile: str = "default", n_eval: int | None = None,
                        ks=KS, show_progress: bool = True) -> QueryEncoderStudy:
    """Recall@k on `cfg`'s eval split (all of it unless `n_eval`; the training never saw it) of the
    starting query encoder (`cfg.retriever`) and of each trained one (`trained[name]` is a final model
    folder holding `query_encoder/`), the passage side fixed. Rows are upserted into results/retrieval.*
    as `dense` (unchanged: the starting encoder) and `dense_e2e_<name>`; the tests into results/end_to_end_recall.*."""
    data: DataConfig = dataclasses.replace(cfg.data, n_eval=n_eval)
    questions, passages = load_study_data(data)
    eval_set, holds = eval_set_name(data, len(questions)), AnswerInPassage()
    encoders = {"dense": cfg.retriever, **{f"dense_e2e_{name}": dataclasses.replace(cfg.retriever, query_encoder=str(Path(final) / QUERY_ENCODER))
                                           for name, final in trained.items()}}
    evals, ctxs, rows = {}, {}, []
    for name, rcfg in encoders.items():
        (ctx,) = contexts(rcfg, passages, max(ks), questions, show_progress=show_progress, corpus_label=corpus_label(data),
                          profile=profile)
        ctxs[name], evals[name] = ctx, evaluate_contexts(name, eval_set, questions, ctx, holds)
        config = describe(cfg.retriever) + (f"; query encoder trained end to end ({name[len('dense_e2e_'):]}, notebook 07)"
                                             if name != "dense" else "")
        if name != "dense":  # the starting encoder's row is notebook 01's `dense` (the same config, the same numbers)
            rows.append(recall_row(evals[name], config, ks))
    table = upsert_rows(profile_results_dir(profile) / "retrieval.csv", rows, key=("retriever", "eval_set"),
                        title=RETRIEVAL_TITLE, note=RETRIEVAL_NOTE, render=lambda t: display_retrieval_table(t, ks))
    tests = recall_tests(evals, "dense", ks).assign(eval_set=eval_set)
    upsert_rows(profile_results_dir(profile) / f"{RECALL_TESTS}.csv", tests.to_dict("records"), key=("retriever", "k", "eval_set"),
                title="End-to-end training and the retriever",
                note=("Produced by notebook 07: answer recall@k of each query encoder trained end to end minus the encoder it "
                      "started from (all-MiniLM-L6-v2), on the same eval questions, passage embeddings fixed. Paired bootstrap "
                      "95% CI of the difference (1,000 resamples) and the exact McNemar p-value."))
    shown = [r["retriever"] for r in rows] + ["dense"]
    return QueryEncoderStudy(table[table["retriever"].isin(shown) & (table["eval_set"] == eval_set)], tests, evals, ctxs, questions)


def recall_tests(evals: dict[str, RetrievalEval], base: str, ks=KS, seed: int = 0) -> pd.DataFrame:
    """recall@k of every retriever minus `base`'s on the same questions: paired bootstrap CI and McNemar."""
    rows = []
    before = evals[base].recall(ks)
    for name, ev in evals.items():
        if name == base:
            continue
        if ev.question_ids != evals[base].question_ids:
            raise ValueError(f"{name} and {base} were evaluated on different questions")
        for k, after in ev.recall(ks).items():
            after, prior = after.astype(bool), before[k].astype(bool)
            test = paired_bootstrap_test(after.astype(float), prior.astype(float), seed=seed)
            rows.append({"retriever": name, "baseline": base, "k": k, "n": len(after), "baseline_recall": float(prior.mean()),
                         "recall": float(after.mean()), "diff": test["diff"], "diff_low": test["ci_low"], "diff_high": test["ci_high"],
                         "p_bootstrap": test["p_value"], "p_mcnemar": mcnemar_exact(after.astype(float), prior.astype(float))["p_value"],
                         "gained": int((after & ~prior).sum()), "lost": int((prior & ~after).sum())})
    return pd.DataFrame(rows)


def top1_changes(before: list[dict], after: list[dict], passages: Sequence[Passage] | Corpus, n: int = 8, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """From two runs' prediction rows on the same questions (a frozen retriever's, an end-to-end one's):
    the questions whose top-1 passage changed, gains first (did the old / new top-1 hold a gold answer,
    and was each answer right), and the counts over all questions."""
    if [r["id"] for r in before] != [r["id"] for r in after]:
        raise ValueError("top1_changes pairs two runs on the same questions, in the same order")
    holds, corpus = AnswerInPassage(), as_corpus(passages)
    changed = [(b, a) for b, a in zip(before, after)
               if a["passage_ids"] and b["passage_ids"] and a["passage_ids"][0] != b["passage_ids"][0]]
    tops = iter(corpus.take(corpus.rows_of([r["passage_ids"][0] for pair in changed for r in pair])) if changed else [])
    rows = []
    for b, a in changed:
        old, new = next(tops), next(tops)
        rows.append({"question": b["question"], "answer": b["answers"][0], "top-1 before": old.id, "held answer before": holds(b["answers"], old),
                     "top-1 after": new.id, "held answer after": holds(b["answers"], new),
                     "prediction before": b["prediction"], "prediction after": a["prediction"], "em before": b["em"], "em after": a["em"]})
    columns = ["question", "answer", "top-1 before", "held answer before", "top-1 after", "held answer after",
               "prediction before", "prediction after", "em before", "em after"]
    table = pd.DataFrame(rows, columns=columns)
    gained = table["held answer after"] & ~table["held answer before"] if len(table) else pd.Series([], dtype=bool)
    lost = table["held answer before"] & ~table["held answer after"] if len(table) else pd.Series([], dtype=bool)
    counts = {"questions": len(before), "top1_changed": len(table), "top1_gained_answer": int(gained.sum()),
              "top1_lost_answer": int(lost.sum())}
    if table.empty:
        return table.assign(change=[]), counts
    table["change"] = np.select([gained, lost], ["gained", "lost"], "neither")
    order = {"gained": 0, "lost": 1, "neither": 2}
    table = table.sample(frac=1.0, random_state=seed).sort_values("change", key=lambda c: c.map(order), kind="stable")
    return table.head(n).reset_index(drop=True), counts


def verdict(tests: pd.DataFrame, k: int = 5, alpha: float = 0.05) -> list[str]:
    """One sentence per trained encoder on recall@k, read off the paired test (the numbers decide)."""
    lines = []
    for row in tests[tests["k"] == k].itertuples():
        if row.p_bootstrap < alpha and row.diff > 0:
            word = "rose"
        elif row.p_bootstrap < alpha and row.diff < 0:
            word = "fell"
        else:
            word = "did not change significantly"
        lines.append(f"{row.retriever}: recall@{k} {word} ({row.baseline_recall:.3f} -> {row.recall:.3f}, diff {row.diff:+.3f} "
                     f"[{row.diff_low:+.3f}, {row.diff_high:+.3f}], p = {row.p_bootstrap:.3g}; {row.gained} questions gained, "
                     f"{row.lost} lost, n = {row.n})")
    return lines
