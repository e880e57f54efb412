"""The retriever interface: `retrieve(questions, k) -> list[list[Hit]]`, plus shared helpers."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError


@dataclass(frozen=True)
class Hit:
    passage_id: str
    score: float
    rank: int  # 1-based


class Retriever(Protocol):
    passages: list[Passage]

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]: ...

    def fingerprint(self) -> str:
        """A hash of everything that changes the output (config, corpus, model)."""
        ...


def corpus_fingerprint(passages: Sequence[Passage]) -> str:
    """sha256 of every passage's [id, title, text] as a JSON line, hashed in one call. It runs on
    every warm index load, so it uses json's C string escaper directly (same bytes as json.dumps)."""
    q = json.encoder.encode_basestring  # ensure_ascii=False escaping, as json.dumps(..., ensure_ascii=False)
    lines = "".join(f"[{q(p.id)}, {q(p.title)}, {q(p.text)}]\n" for p in passages)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


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


def hits_from_arrays(passages: Sequence[Passage], indices: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
    """Turn (n_questions, k) index/score arrays into ranked Hit lists (negative indices skipped)."""
    out = []
    for row_idx, row_scores in zip(indices, scores):
        hits = [Hit(passages[int(i)].id, float(s), r) for r, (i, s) in enumerate(zip(row_idx, row_scores), start=1) if i >= 0]
        out.append(hits)
    return out
