"""Compose the parts: closed-book and retrieval-augmented answering.

Components are passed in, never looked up by name:

    preds = closed_book(questions, generator)
    preds = rag(questions, retriever, generator, k=5)
"""
from __future__ import annotations

from typing import Sequence

from rag_lab.data.records import Passage, QAExample
from rag_lab.retrievers.base import Hit


def closed_book(examples: Sequence[QAExample], generator, **kwargs) -> list[dict]:
    """The generator answers from its parameters alone."""
    return generator.generate(examples, None, **kwargs)


def contexts_from_hits(hits: Sequence[Sequence[Hit]], passages: Sequence[Passage], k: int | None = None) -> list[list[Passage]]:
    by_id = {p.id: p for p in passages}
    return [[by_id[h.passage_id] for h in row[:k]] for row in hits]


def rag(examples: Sequence[QAExample], retriever, generator, k: int, **kwargs) -> list[dict]:
    """Retrieve the top-k passages per question, then let the generator read them."""
    hits = retriever.retrieve(examples, k)
    preds = generator.generate(examples, contexts_from_hits(hits, retriever.passages), **kwargs)
    for pred, row in zip(preds, hits):
        pred["passage_ids"] = [h.passage_id for h in row]
    return preds
