"""Retrievers with one interface: `retrieve(questions, k) -> list[list[Hit]]`.

    bm25 = BM25Retriever(passages)                       # bm25s, index cached by hash
    dense = DenseRetriever(passages, "all-minilm-l6-v2")  # FAISS over cached embeddings
    hybrid = HybridRetriever(bm25, dense)                # reciprocal-rank fusion
    hits = cached_retrieve(hybrid, questions, k=20)      # results cached per question set
    oracle = OracleRetriever(passages, bm25)             # analysis only: passages that hold a gold answer string
    gold = GoldPassageRetriever(passages)                # analysis only: the NQ-annotated gold passage
"""
from __future__ import annotations

from typing import Sequence

from rag_lab.data.corpus import Corpus
from rag_lab.data.records import Passage
from rag_lab.retrievers.base import Hit, Retriever
from rag_lab.retrievers.bm25 import BM25Retriever
from rag_lab.retrievers.cache import cached_retrieve
from rag_lab.retrievers.dense import ENCODE_CHUNK, DenseRetriever, build_faiss_index, shard_rows
from rag_lab.retrievers.hybrid import HybridRetriever, rrf_fuse, weighted_fuse
from rag_lab.retrievers.gold import GoldPassageRetriever
from rag_lab.retrievers.oracle import OracleRetriever


def build_retriever(cfg, passages: Sequence[Passage] | Corpus, cache_dir=None, show_progress: bool = True,
                    chunk: int = ENCODE_CHUNK):
    """A retriever from a `RetrieverConfig` (kind: bm25 | dense | hybrid | oracle | gold)."""
    def bm25():
        return BM25Retriever(passages, cfg.k1, cfg.b, cfg.stopwords, cfg.stemmer, cache_dir, show_progress)

    def dense():
        return dense_encoder(cfg, passages, cache_dir, show_progress, chunk, build=True)

    builders = {
        "bm25": bm25,
        "dense": dense,
        "hybrid": lambda: HybridRetriever(bm25(), dense(), cfg.fusion, cfg.rrf_k, cfg.dense_weight),
        "oracle": lambda: OracleRetriever(passages, bm25()),
        "gold": lambda: GoldPassageRetriever(passages),
    }
    if cfg.kind not in builders:
        raise ValueError(f"retriever.kind {cfg.kind!r} builds no retriever; kinds: {', '.join(builders)}")
    return builders[cfg.kind]()


def dense_encoder(cfg, passages: Sequence[Passage] | Corpus, cache_dir=None, show_progress: bool = True,
                  chunk: int = ENCODE_CHUNK, build: bool = False) -> DenseRetriever:
    """The dense retriever of `cfg` (kind dense or hybrid); `build=False` encodes nothing yet: call its
    `encode_shard(i, n)` for one shard of the corpus (`rag-lab index --shard`, a Ray worker)."""
    return DenseRetriever(passages, cfg.encoder, cfg.query_prefix, cfg.passage_prefix, cfg.max_length,
                          cfg.index_factory, cfg.search_params, cfg.encode_batch_size, cache_dir, show_progress,
                          query_encoder=cfg.query_encoder, embedding_dtype=cfg.embedding_dtype, chunk=chunk, build=build,
                          encoder_backend=cfg.encoder_backend)


__all__ = ["Hit", "Retriever", "BM25Retriever", "DenseRetriever", "HybridRetriever", "OracleRetriever", "GoldPassageRetriever", "build_retriever",
           "dense_encoder", "shard_rows", "build_faiss_index", "cached_retrieve", "rrf_fuse", "weighted_fuse"]
