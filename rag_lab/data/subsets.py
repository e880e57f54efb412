"""Seeded subsets for smaller profiles: questions, and a corpus that still holds answers."""
from __future__ import annotations

import random
from typing import Sequence

from rag_lab.data.chunking import window_passages
from rag_lab.data import load_corpus
from rag_lab.data.corpus import Corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError
from rag_lab.metrics import AnswerInPassage


def eval_set_name(data_cfg, n: int) -> str:
    """The name a results row gives its question set, e.g. 'nq-mini/eval n=300 seed=0'.

    Rows are compared or paired only when these names agree; the seed is named only when it
    picked a subset (`n_eval` set)."""
    subset = f" seed={data_cfg.subset_seed}" if data_cfg.n_eval else ""
    lens = " answer-in-corpus" if getattr(data_cfg, "only_answer_in_corpus", False) else ""
    lens += " gold-passage" if getattr(data_cfg, "only_gold_passage", False) else ""
    if getattr(data_cfg, "only_gold_passage", False) and data_cfg.n_eval:  # the lens cuts a subset: name both sizes
        return f"{data_cfg.dataset}/{data_cfg.eval_split} n={data_cfg.n_eval}{subset}{lens} n={n}"
    return f"{data_cfg.dataset}/{data_cfg.eval_split} n={n}{subset}{lens}"


def subset_questions(questions: Sequence[QAExample], n: int | None, seed: int = 0) -> list[QAExample]:
    """A seeded random subset of n questions, kept in the original order (all when n is None)."""
    if n is None or n >= len(questions):
        return list(questions)
    keep = set(random.Random(seed).sample(range(len(questions)), n))
    return [q for i, q in enumerate(questions) if i in keep]


def corpus_for(data_cfg, questions: Sequence[QAExample]) -> Corpus:
    """The passages an experiment reads: `data.corpus`, split into sentence windows when
    `data.window_words` is set, then cut to `data.n_corpus` (keeping answers to `questions`)."""
    passages = load_corpus(data_cfg.corpus)
    if data_cfg.window_words:  # an in-memory corpus of windows: meant for small corpora (nq-mini: 12k passages)
        passages = Corpus.from_passages(window_passages(passages, data_cfg.window_words), f"{data_cfg.corpus} windows")
    return subset_corpus(passages, questions, data_cfg.n_corpus, data_cfg.subset_seed)


def corpus_label(data_cfg) -> str:
    """How a run's passages are named in timings: 'nq-mini', 'nq-mini windows<=40w', ..."""
    parts = [data_cfg.corpus] + ([f"windows<={data_cfg.window_words}w"] if data_cfg.window_words else [])
    return " ".join(parts + ([f"n_corpus={data_cfg.n_corpus}"] if data_cfg.n_corpus else []))


def gold_rows(passages: Corpus, questions: Sequence[QAExample]) -> set[int]:
    """Rows of the questions' annotated gold passages, or of their sentence windows (`<id>~<j>`) in a windowed
    corpus. (An annotated id a corpus lacks is the gold retriever's error to raise, naming the id.)"""
    wanted = {q.gold_passage_id for q in questions if q.gold_passage_id}
    if not wanted:
        return set()
    ids = passages.table.column("id").to_pylist()
    return {i for i, pid in enumerate(ids) if pid in wanted or pid.rpartition("~")[0] in wanted}


def subset_corpus(passages: Corpus, questions: Sequence[QAExample], n: int | None, seed: int = 0) -> Corpus:
    """n passages: the questions' annotated gold passages (the gold-passage oracle reads them), then up to
    half of n ones that hold an answer to `questions` (so a small profile still has something to find),
    the rest a seeded random sample; original order kept."""
    if n is None or n >= len(passages):
        return passages
    holds = AnswerInPassage()
    gold = gold_rows(passages, questions)
    if len(gold) > n:
        raise DataError(f"data.n_corpus = {n} cannot hold the {len(gold)} annotated gold passages of the questions; raise it")
    with_answer = [i for i, p in enumerate(passages) if i not in gold and any(holds(q.answers, p) for q in questions)]
    rng = random.Random(seed)
    chosen = gold | set(rng.sample(with_answer, min(len(with_answer), max(0, n // 2 - len(gold)))))
    rest = [i for i in range(len(passages)) if i not in chosen]
    chosen |= set(rng.sample(rest, n - len(chosen)))
    return passages.select(sorted(chosen))
