"""The gold-passage oracle: the passage NQ's annotators marked as holding the answer (the question's
`gold_passage_id`). An upper bound for analysis, not a system: it reads the annotation.

Unlike the answer-string oracle (`oracle.py`: any passage containing a gold answer string, which a
short answer such as "one" finds by chance), this passage was chosen by a person reading the question,
so "given the passage, the reader still misses" is a reader miss without that caveat. A question
without an annotated passage gets none (filter them out with `data.only_gold_passage`).
"""
from __future__ import annotations

from typing import Sequence

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import stable_hash
from rag_lab.retrievers.base import Hit, check_k, check_questions


class GoldPassageRetriever:
    """Each question's `gold_passage_id`, looked up in the corpus (an id the corpus lacks is an error)."""

    def __init__(self, passages: Sequence[Passage] | Corpus):
        self.passages = as_corpus(passages)

    @property
    def parts(self) -> tuple:
        return ()

    def fingerprint(self) -> str:
        return stable_hash({"kind": "gold", "corpus": self.passages.fingerprint})

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        check_k(k)
        check_questions(questions)
        wanted = [q.gold_passage_id for q in questions if q.gold_passage_id]
        self.passages.rows_of(wanted)  # every annotated id must be a corpus passage: a DataError names the missing ones
        return [[Hit(q.gold_passage_id, 1.0, 1)] if q.gold_passage_id else [] for q in questions]
