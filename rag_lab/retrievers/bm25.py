"""BM25 with bm25s: sparse-matrix scoring, an index saved once and reloaded by hash."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import Stemmer
import bm25s
import numpy as np

from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.io import atomic_dir, folder_is_intact, stable_hash, write_manifest
from rag_lab.retrievers.base import Hit, check_k, check_questions, corpus_fingerprint, hits_from_arrays
from rag_lab.retrievers.cache import retriever_cache_dir


class BM25Retriever:
    """Okapi BM25 (Lucene variant) over `passage_text`; stopwords and stemming configurable."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75,
                 stopwords: str | None = "en", stemmer: str | None = "english",
                 cache_dir: Path | None = None, show_progress: bool = True):
        if not passages:
            raise ValueError("BM25Retriever needs a non-empty corpus")
        self.passages = list(passages)
        self.params = {"k1": k1, "b": b, "stopwords": stopwords, "stemmer": stemmer}
        self.show_progress = show_progress
        self._stemmer = _make_stemmer(stemmer)
        self._corpus_hash = corpus_fingerprint(self.passages)
        self.cache_hit = False
        self.build: dict | None = None  # {"kind", "seconds"} when this process built the index (timings.csv)
        self.index = self._load_or_build(cache_dir)

    def fingerprint(self) -> str:
        return stable_hash({"kind": "bm25", **self.params, "corpus": self._corpus_hash, "bm25s": bm25s.__version__})

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        """The tokens BM25 sees (also what the rank_bm25 benchmark is given)."""
        return bm25s.tokenize(texts, stopwords=self.params["stopwords"] or [], stemmer=self._stemmer,
                              return_ids=False, show_progress=False)

    def _load_or_build(self, cache_dir: Path | None) -> bm25s.BM25:
        folder = retriever_cache_dir(cache_dir) / f"bm25-{self.fingerprint()[:16]}"
        if folder_is_intact(folder):  # every file checked against the manifest; a damaged index is rebuilt
            self.cache_hit = True
            return bm25s.BM25.load(str(folder), show_progress=False)
        t0 = time.perf_counter()
        index = bm25s.BM25(k1=self.params["k1"], b=self.params["b"])
        tokens = bm25s.tokenize([passage_text(p) for p in self.passages], stopwords=self.params["stopwords"] or [],
                                stemmer=self._stemmer, show_progress=self.show_progress)
        index.index(tokens, show_progress=self.show_progress)
        with atomic_dir(folder) as tmp:
            index.save(str(tmp), show_progress=False)
            write_manifest(tmp)
        self.build = {"kind": "bm25", "seconds": time.perf_counter() - t0, "note": f"{len(self.passages)} passages"}
        return index

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = min(check_k(k), len(self.passages))  # k beyond the corpus: every passage, ranked
        tokens = self.tokenize(check_questions(questions))
        # a query whose every token is a stopword / unknown scores 0 everywhere: still k hits
        indices, scores = self.index.retrieve(tokens, k=k, show_progress=self.show_progress, n_threads=0)
        return hits_from_arrays(self.passages, np.asarray(indices), np.asarray(scores))


def _make_stemmer(language: str | None):
    if language is None:
        return None

    try:
        return Stemmer.Stemmer(language).stemWords
    except KeyError:
        raise ValueError(f"unknown stemmer language {language!r}; PyStemmer knows {', '.join(Stemmer.algorithms())}") from None
