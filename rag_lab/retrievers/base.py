"""The retriever interface: `retrieve(questions, k) -> list[list[Hit]]`, plus shared helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError, UserError


class RetrieverSettingError(UserError, ValueError):
    """A retriever setting its library rejects (a FAISS string, a stemmer or stopword name): one line naming the key."""


@dataclass(frozen=True)
class Hit:
    passage_id: str
    score: float
    rank: int  # 1-based


class Retriever(Protocol):
    passages: Corpus

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]: ...

    def fingerprint(self) -> str:
        """A hash of everything that changes the output (config, corpus, model)."""
        ...


def corpus_fingerprint(passages: Sequence[Passage] | Corpus) -> str:
    """sha256 of every passage's [id, title, text] as a JSON line (`Corpus.fingerprint`: kept in a
    converted corpus's manifest, so a warm load does not hash the corpus again)."""
    return as_corpus(passages).fingerprint


def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_questions(questions: Sequence[QAExample]) -> list[str]:
    """The question strings; an empty one is an error naming its id."""
    texts = []
    for q in questions:
        if not q.question or not q.question.strip():
            raise DataError(f"question {q.id!r} is empty")
        texts.append(q.question)
    return texts


def hits_from_arrays(passages: Corpus, indices: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
    """Turn (n_questions, k) row/score arrays into ranked Hit lists (negative rows skipped); the ids
    are read from the corpus in one call."""
    indices = np.asarray(indices)
    ids = iter(passages.ids_at(indices[indices >= 0]))
    return [[Hit(next(ids), float(s), r) for r, (i, s) in enumerate(zip(row_idx, row_scores), start=1) if i >= 0]
            for row_idx, row_scores in zip(indices, scores)]
