"""The oracle passage: an upper bound for analysis, not a system.

For each question it returns corpus passages that contain a gold answer (DPR has-answer
semantics, the same test as `answer_in_passages`), best BM25 match to the question first.
A reader given this passage and still wrong is a reader miss; so "retrieval missed" and
"reader failed" separate in one number. It reads the gold answers: never use it as a retriever.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import stable_hash
from rag_lab.metrics import AnswerInPassage
from rag_lab.retrievers.base import Hit, check_k, check_questions
from rag_lab.retrievers.bm25 import BM25Retriever


class OracleRetriever:
    """Answer-bearing passages ranked by BM25; a question with none gets no passage."""

    def __init__(self, passages: Sequence[Passage] | Corpus, ranker: BM25Retriever):
        self.passages, self.ranker = as_corpus(passages), ranker
        self._holds = AnswerInPassage()
        self._texts: list[str] | None = None

    @property
    def parts(self) -> tuple:
        return (self.ranker,)

    def fingerprint(self) -> str:
        return stable_hash({"kind": "oracle", "ranker": self.ranker.fingerprint()})

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = check_k(k)
        tokens = self.ranker.tokenize(check_questions(questions))
        if self._texts is None:  # every passage normalised once, in one pass over the corpus
            self._texts = [self._holds.normalized(p) for p in self.passages]
        out = []
        for q, query in zip(questions, tokens):
            bearing = np.array([i for i, t in enumerate(self._texts) if self._holds.in_normalized(q.answers, t)], dtype=np.int64)
            if not len(bearing):
                out.append([])
                continue
            scores = self.ranker.index.get_scores(query)[bearing] if query else np.zeros(len(bearing))
            order = np.lexsort((bearing, -scores))[:k]  # best score first, ties in corpus order
            ids = self.passages.ids_at(bearing[order])
            out.append([Hit(pid, float(scores[j]), r) for r, (pid, j) in enumerate(zip(ids, order), start=1)])
        return out
