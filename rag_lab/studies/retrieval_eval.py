"""Answer recall@k of a retriever, with bootstrap CIs, on the full eval set and the
answer-in-corpus subset; rows for results/retrieval.{csv,md}."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rag_lab.studies.budget import budget_curve, choose_setting, curves_table
from rag_lab.config import GeneratorConfig, RetrieverConfig, RetrieverTrainingConfig, load_experiment
from rag_lab.data import load_qa
from rag_lab.data.records import Passage, QAExample
from rag_lab.data.subsets import corpus_for, corpus_label, eval_set_name, subset_questions
from rag_lab.generators import prompt_builder
from rag_lab.io import verified_folder
from rag_lab.metrics import AnswerInPassage, answer_recall_at_k, bootstrap_ci
from rag_lab.models import load_tokenizer, resolve_model
from rag_lab.paths import profile_results_dir
from rag_lab.pipeline import Contexts, contexts, contexts_from_hits
from rag_lab.reporting.results import KS, display_budget_table, display_retrieval_table, upsert_rows
from rag_lab.retrievers.base import Hit
from rag_lab.training import train_dense_retriever
from rag_lab.training.common import TRAINING_FILE

MINING_RETRIEVER = RetrieverConfig(kind="bm25")  # DPR mines positives and hard negatives from BM25's ranking
# The literature's figures over all of Wikipedia (DPR's 21M 100-word passages, NQ-open test), to read beside ours:
# NQ-mini 2 plants the gold passages among passages not chosen as their neighbours, so it is somewhat easier.
LITERATURE = pd.DataFrame([
    {"retriever": "BM25", "corpus": "DPR Wikipedia, 21M passages", "R@20": 0.591, "R@100": 0.737,
     "source": "Karpukhin et al. 2020 (DPR), Table 2, NQ test"},
    {"retriever": "BM25 (pyserini)", "corpus": "DPR Wikipedia, 21M passages", "R@20": 0.629, "R@100": 0.783,
     "source": "Ma et al. 2021, 'A Replication Study of Dense Passage Retriever', NQ test"},
    {"retriever": "DPR (single, NQ-trained)", "corpus": "DPR Wikipedia, 21M passages", "R@20": 0.784, "R@100": 0.854,
     "source": "Karpukhin et al. 2020 (DPR), Table 2, NQ test"},
])
RETRIEVAL_TITLE = "Answer recall@k of each retriever"
RETRIEVAL_NOTE = ("Produced by `rag-lab retrieval experiments/retrieval.yaml` (notebook 01); the dense_e2e_* rows by notebook 07 "
                  "(query encoders trained end to end through the reader, passage embeddings fixed). 95% bootstrap CIs "
                  "(1,000 resamples); 'in corpus' = questions whose answer occurs somewhere in the corpus.")


@dataclass
class RetrievalEval:
    """Per-question answer hits of one retriever on one question set."""

    name: str
    eval_set: str
    question_ids: list[str]
    matrix: np.ndarray  # (n, depth) bool
    in_corpus: np.ndarray  # (n,) bool: some gold occurs anywhere in the corpus

    def recall(self, ks: Sequence[int] = KS, subset: bool = False) -> dict[int, np.ndarray]:
        m = self.matrix[self.in_corpus] if subset else self.matrix
        return answer_recall_at_k(m, ks)


def evaluate_contexts(name: str, eval_set: str, questions: Sequence[QAExample], ctx: Contexts,
                      holds: AnswerInPassage | None = None) -> RetrievalEval:
    """Which ranks of each question's retrieved passages hold a gold answer."""
    in_corpus = np.array([bool(q.answer_in_corpus) for q in questions])
    matrix = (holds or AnswerInPassage()).matrix(questions, ctx.passages)
    return RetrievalEval(name, eval_set, [q.id for q in questions], matrix, in_corpus)


def recall_row(ev: RetrievalEval, config: str, ks: Sequence[int] = KS, seed: int = 0) -> dict:
    """One table row: numeric mean/low/high columns (CSV) for the full set and the subset."""
    row = {"retriever": ev.name, "config": config, "eval_set": ev.eval_set, "n": len(ev.question_ids),
           "n_answer_in_corpus": int(ev.in_corpus.sum())}
    for subset, suffix in ((False, ""), (True, "_in_corpus")):
        if subset and not ev.in_corpus.any():
            continue
        for k, values in ev.recall(ks, subset).items():
            mean, low, high = bootstrap_ci(values, seed=seed)
            row[f"R@{k}{suffix}"], row[f"R@{k}{suffix}_low"], row[f"R@{k}{suffix}_high"] = mean, low, high
    return row


def recall_curve(ev: RetrievalEval, ks: Sequence[int] | None = None, subset: bool = False, seed: int = 0) -> pd.DataFrame:
    """recall@k with a 95% CI for every k (for the curves in notebook 01)."""
    ks = list(ks or range(1, ev.matrix.shape[1] + 1))
    rows = [(k, *bootstrap_ci(v, seed=seed)) for k, v in ev.recall(ks, subset).items()]
    return pd.DataFrame(rows, columns=["k", "recall", "low", "high"]).assign(retriever=ev.name)


# ---------------------------------------------------------------- the study of notebook 01

@dataclass
class StudyResult:
    table: pd.DataFrame  # every row of the results table (this study's and earlier ones)
    rows: pd.DataFrame  # this study's rows only
    evals: dict[str, RetrievalEval]
    hits: dict[str, list[list[Hit]]]
    questions: list[QAExample]
    passages: list[Passage]
    timings: dict[str, float]


def load_study_data(data_cfg) -> tuple[list[QAExample], list[Passage]]:
    questions = subset_questions(load_qa(data_cfg.dataset, data_cfg.eval_split), data_cfg.n_eval, data_cfg.subset_seed)
    return questions, corpus_for(data_cfg, questions)


def run_retrieval_study(cfg, profile: str = "default", cache_dir: Path | None = None, show_progress: bool = True) -> StudyResult:
    """Train the dense retriever if a config needs it, retrieve for every configured retriever
    (results cached), score answer recall@k, and upsert one row each into results/retrieval.*"""
    questions, passages = load_study_data(cfg.data)
    holds, eval_set = AnswerInPassage(), eval_set_name(cfg.data, len(questions))
    evals, hits, rows, timings = {}, {}, [], {}
    for name, rcfg in cfg.retrievers.items():
        t0 = time.perf_counter()
        if rcfg.kind in ("dense", "hybrid") and rcfg.encoder == cfg.train_retriever.output:
            ensure_retriever_trained(cfg.train_retriever, cfg.data, passages, cache_dir, show_progress)
        (ctx,) = contexts(rcfg, passages, cfg.depth, questions, cache_dir=cache_dir, show_progress=show_progress,
                          corpus_label=corpus_label(cfg.data), profile=profile)
        hits[name] = ctx.hits
        evals[name] = evaluate_contexts(name, eval_set, questions, ctx, holds)
        timings[name] = time.perf_counter() - t0
        rows.append(recall_row(evals[name], describe(rcfg), cfg.ks))
    table = upsert_rows(profile_results_dir(profile) / "retrieval.csv", rows, key=("retriever", "eval_set"),
                        title=RETRIEVAL_TITLE, note=RETRIEVAL_NOTE,
                        render=lambda t: display_retrieval_table(t, cfg.ks))
    return StudyResult(table, pd.DataFrame(rows), evals, hits, questions, passages, timings)


def describe(rcfg) -> str:
    """A short human-readable summary of a retriever config for the table."""
    if rcfg.kind == "bm25":
        return f"bm25s k1={rcfg.k1} b={rcfg.b} stopwords={rcfg.stopwords} stemmer={rcfg.stemmer}"
    dense = f"{Path(rcfg.encoder).name} max_len={rcfg.max_length} faiss={rcfg.index_factory}"
    if rcfg.kind == "dense":
        return dense
    fusion = f"rrf k={rcfg.rrf_k}" if rcfg.fusion == "rrf" else f"weighted w_dense={rcfg.dense_weight}"
    return f"bm25 + {dense}, {fusion}"


def worked_examples(study: StudyResult, retriever: str, n: int = 3, top: int = 3) -> list[dict]:
    """n questions (first with the answer in the top passages, first without, first with it
    only deeper down), each with its top passages and whether each holds a gold answer."""
    ev = study.evals[retriever]
    found_top = ev.matrix[:, :top].any(axis=1)
    found_deeper = ev.matrix.any(axis=1) & ~found_top
    picks = []
    for mask in (found_top, ~ev.matrix.any(axis=1), found_deeper):
        idx = next((i for i in range(len(mask)) if mask[i] and i not in picks), None)
        if idx is not None:
            picks.append(idx)
    out = []
    for i in picks[:n]:
        q, hits = study.questions[i], study.hits[retriever][i][:top]
        (shown,) = contexts_from_hits([hits], study.passages)
        passages = [{"rank": h.rank, "score": round(h.score, 3), "has_answer": bool(ev.matrix[i, h.rank - 1]),
                     "title": p.title, "text": p.text} for h, p in zip(hits, shown)]
        first = int(ev.matrix[i].argmax()) + 1 if ev.matrix[i].any() else None
        out.append({"id": q.id, "question": q.question, "answers": list(q.answers),
                    "first_rank_with_answer": first, "passages": passages})
    return out


def format_example(example: dict, width: int = 220) -> str:
    lines = [f"Q [{example['id']}]: {example['question']}", f"   gold: {example['answers']}",
             f"   first rank holding an answer: {example['first_rank_with_answer']}"]
    for p in example["passages"]:
        mark = "✔" if p["has_answer"] else "✘"
        text = p["text"] if len(p["text"]) <= width else p["text"][:width] + "…"
        lines.append(f"   {mark} #{p['rank']} ({p['score']}) {p['title']}: {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------- recall per prompt token (notebook 01)

@dataclass
class BudgetStudy:
    curves: list  # budget.BudgetCurve, one per (retriever, granularity)
    table: pd.DataFrame  # results/recall_budget.csv
    best: object  # the BudgetCurve with the highest recall at `choose_at`
    ranking: pd.DataFrame  # every setting at `choose_at`, paired McNemar p against the best
    eval_set: str
    timings: dict[str, float]
    choose_at: int = 0


def run_budget_study(cfg, profile: str = "default", cache_dir: Path | None = None, show_progress: bool = True) -> BudgetStudy:
    """Recall at each context budget for every (retriever, passage granularity) of `cfg.budget`, on
    dev questions from the train split; results/recall_budget.{csv,md}."""
    b = cfg.budget
    dev_data = dataclasses.replace(cfg.data, eval_split=cfg.data.train_split, n_eval=b.n_dev)
    questions = subset_questions(load_qa(dev_data.dataset, dev_data.eval_split), b.n_dev, dev_data.subset_seed)
    eval_set = eval_set_name(dev_data, len(questions)) + " (dev: train split)"
    builder = prompt_builder(GeneratorConfig(model=b.reader), load_tokenizer(str(resolve_model(b.reader)), padding_side="left"))
    curves, timings = [], {}
    for words in [None, *b.window_words]:
        data = dataclasses.replace(cfg.data, window_words=words)
        passages = corpus_for(data, questions)
        granularity = "passages" if words is None else f"windows<={words}w"
        for name in b.retrievers:
            t0 = time.perf_counter()
            (ctx,) = contexts(cfg.retrievers[name], passages, b.depth, questions, cache_dir=cache_dir,
                              show_progress=show_progress, corpus_label=corpus_label(data), profile=profile)
            curves.append(budget_curve(name, granularity, questions, ctx.passages, builder, b.budgets))
            timings[f"{name}, {granularity}"] = time.perf_counter() - t0
    rows = curves_table(curves).assign(eval_set=eval_set, reader=b.reader)
    table = upsert_rows(profile_results_dir(profile) / "recall_budget.csv", rows.to_dict("records"),
                        key=("setting", "budget", "eval_set"), title="Answer recall at a context budget (reader tokens)",
                        note=("Produced by `rag-lab retrieval experiments/retrieval.yaml` (notebook 01) on dev questions from "
                              "the train split. recall = a gold answer occurs in the passages packed, best-ranked first, into "
                              "`budget` tokens of the reader's prompt (the last passage cut to fit); 95% bootstrap CIs."),
                        render=display_budget_table)
    best, ranking = choose_setting(curves, b.choose_at)
    return BudgetStudy(curves, table, best, ranking, eval_set, timings, b.choose_at)


RAG_ROWS = ("rag_zero_shot", "finetune_rag", "qwen_rag")  # the main table's RAG rows that follow the budget study


def check_rag_rows_follow(study: BudgetStudy, experiments: Path, profile: str = "default") -> str:
    """Whether the main table's RAG rows use the setting the budget study found best (a message; a
    tiny smoke profile may disagree, and the committed default rows say why they use theirs)."""
    best, lines = study.best, []
    for name in RAG_ROWS:
        cfg = load_experiment(experiments / f"{name}.yaml", profile)
        granularity = f"windows<={cfg.data.window_words}w" if cfg.data.window_words else "passages"
        used = f"{cfg.retriever.kind}, {granularity}"
        same_budget = cfg.generator.max_context_tokens == study.choose_at
        verdict = ("the best setting measured here" if used == best.setting and same_budget else
                   f"differs from the best measured here ({best.setting}, {study.choose_at} context tokens)")
        lines.append(f"{name}: {used}, {cfg.generator.max_context_tokens} context tokens — {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the fine-tuned dense retriever it compares

def ensure_retriever_trained(tcfg: RetrieverTrainingConfig, data_cfg, passages: Sequence[Passage], cache: Path | None = None,
                             show_progress: bool = True) -> Path:
    """The dense retriever fine-tuned on the train split (pairs mined from each question's BM25
    top `mining_depth` over `passages`), at `tcfg.output`; reused when a model trained with this
    exact config (recorded in its rag_lab_training.json) is already there."""
    out = Path(tcfg.output)
    what = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "output"}  # what is trained, not where it goes
    record = json.loads(json.dumps({"train_retriever": what, "data": dataclasses.asdict(data_cfg),
                                    "n_passages": len(passages)}, default=str))
    report = out / TRAINING_FILE  # written with the weights: the study's config is part of it
    if report.exists() and json.loads(report.read_text(encoding="utf-8")).get("study_config") == record \
            and verified_folder(out):  # damaged weights are deleted and trained again
        return out
    train = subset_questions(load_qa(data_cfg.dataset, data_cfg.train_split), data_cfg.n_train, data_cfg.subset_seed)
    (bm25,) = contexts(MINING_RETRIEVER, passages, tcfg.mining_depth, train, cache_dir=cache, show_progress=show_progress)
    train_dense_retriever(train, bm25.passages, tcfg, out, notes={"study_config": record})
    return out
