"""The contexts stage: which passages each question's reader sees, cached by content.

Everything that needs retrieved passages — the runner (evaluation), the trainers (training and dev
questions, through the runner), the retrieval and budget studies — calls `contexts`; nothing else
builds a retriever.

    (ctx,) = contexts(cfg.retriever, passages, k, questions)
    train_ctx, dev_ctx = contexts(cfg.retriever, passages, k, train, dev)   # one retriever, two question sets
    ctx.passages[i]   # the k passages question i's reader sees, best first
    ctx.hits[i]       # their ids, scores and ranks

The index is cached under `paths.cache_dir("retrieval")` by the retriever's fingerprint (its
settings, encoder weights and the corpus text); the hits of each question set by (fingerprint,
question ids and text, k).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.retrievers import build_retriever, cached_retrieve
from rag_lab.retrievers.base import Hit
from rag_lab.reporting.timings import record_index_builds


@dataclass(frozen=True)
class Contexts:
    """The retrieved passages of one question set, question by question, best first."""

    hits: list[list[Hit]]
    passages: list[list[Passage]]

    def ids(self) -> list[list[str]]:
        return [[h.passage_id for h in row] for row in self.hits]


def contexts(retriever_cfg, passages: Sequence[Passage], k: int, *question_sets: Sequence[QAExample],
             cache_dir: Path | None = None, show_progress: bool = True, corpus_label: str | None = None,
             profile: str = "default") -> list[Contexts]:
    """The top-`k` passages of `passages` for every question of each set, from the retriever that
    `retriever_cfg` (a `RetrieverConfig`) describes; one `Contexts` per set, in order.

    The retriever is built once (its index loaded from the cache when one was built over the same
    corpus with the same settings); an empty question set gets empty contexts. With `corpus_label`,
    an index built in this process is recorded in timings.csv under that corpus name.
    """
    retriever = build_index(retriever_cfg, passages, cache_dir, show_progress, corpus_label, profile)
    out = []
    for questions in question_sets:
        hits = cached_retrieve(retriever, questions, k, cache_dir) if questions else []
        out.append(Contexts(hits, contexts_from_hits(hits, passages)))
    return out


def build_index(retriever_cfg, passages: Sequence[Passage] | Corpus, cache_dir: Path | None = None, show_progress: bool = True,
                corpus_label: str | None = None, profile: str = "default"):
    """The retriever of `retriever_cfg` over `passages`, its index built (or loaded from the cache); with
    `corpus_label`, an index built in this process is recorded in timings.csv under that corpus name.
    `rag-lab index` calls it to build ahead of a run what the run will then load."""
    retriever = build_retriever(retriever_cfg, passages, cache_dir=cache_dir, show_progress=show_progress)
    if corpus_label is not None:
        record_index_builds(retriever, corpus_label, profile)
    return retriever


def dense_index(retriever_cfg, passages: Sequence[Passage], cache_dir: Path | None = None, show_progress: bool = True):
    """The dense retriever of `retriever_cfg` over `passages` (embeddings and FAISS index loaded from
    the cache when built before): what end-to-end training searches with its own query encoder."""
    if retriever_cfg.kind != "dense":
        raise ValueError(f"retriever.kind {retriever_cfg.kind!r} has no trainable query encoder: end-to-end training needs "
                         "retriever.kind: dense")
    return build_retriever(retriever_cfg, passages, cache_dir=cache_dir, show_progress=show_progress)


def contexts_from_hits(hits: Sequence[Sequence[Hit]], passages: Sequence[Passage] | Corpus) -> list[list[Passage]]:
    """The passages that `hits` name, looked up by id in the corpus (one Arrow lookup for all of them)."""
    corpus = as_corpus(passages)
    ids = [h.passage_id for row in hits for h in row]
    found = iter(corpus.take(corpus.rows_of(ids)) if ids else [])
    return [[next(found) for _ in row] for row in hits]
