"""Hybrid retrieval: fuse two retrievers' rankings (reciprocal-rank fusion or weighted scores)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rag_lab.data.records import QAExample
from rag_lab.io import stable_hash
from rag_lab.retrievers.base import Hit, check_k


def rrf_fuse(rankings: Sequence[Sequence[Hit]], rrf_k: int = 60) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion (Cormack et al. 2009): score(d) = sum over lists of 1 / (rrf_k + rank).
    Ties break by passage id, so the order is deterministic."""
    scores: dict[str, float] = {}
    for hits in rankings:
        for h in hits:
            scores[h.passage_id] = scores.get(h.passage_id, 0.0) + 1.0 / (rrf_k + h.rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def weighted_fuse(first: Sequence[Hit], second: Sequence[Hit], weight_second: float) -> list[tuple[str, float]]:
    """(1 - w) * minmax(first scores) + w * minmax(second scores); a passage absent from a list gets 0 there."""
    def minmax(hits):
        if not hits:
            return {}
        s = np.array([h.score for h in hits], dtype=np.float64)
        span = s.max() - s.min()
        norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
        return {h.passage_id: float(v) for h, v in zip(hits, norm)}

    a, b = minmax(first), minmax(second)
    fused = {pid: (1 - weight_second) * a.get(pid, 0.0) + weight_second * b.get(pid, 0.0) for pid in a.keys() | b.keys()}
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


class HybridRetriever:
    """Fuse the top-`depth` lists of two retrievers (e.g. BM25 + dense) and keep the top k."""

    def __init__(self, first, second, fusion: str = "rrf", rrf_k: int = 60, weight_second: float = 0.5, depth: int = 100):
        if fusion not in ("rrf", "weighted"):
            raise ValueError(f"fusion must be 'rrf' or 'weighted', got {fusion!r}")
        self.first, self.second = first, second
        self.passages = first.passages
        self.fusion, self.rrf_k, self.weight_second, self.depth = fusion, rrf_k, weight_second, depth

    @property
    def parts(self) -> tuple:
        return (self.first, self.second)

    def fingerprint(self) -> str:
        return stable_hash({"kind": "hybrid", "first": self.first.fingerprint(), "second": self.second.fingerprint(),
                            "fusion": self.fusion, "rrf_k": self.rrf_k, "w": self.weight_second, "depth": self.depth})

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = check_k(k)
        depth = max(self.depth, k)
        a, b = self.first.retrieve(questions, depth), self.second.retrieve(questions, depth)
        out = []
        for hits_a, hits_b in zip(a, b):
            fused = rrf_fuse([hits_a, hits_b], self.rrf_k) if self.fusion == "rrf" else weighted_fuse(hits_a, hits_b, self.weight_second)
            out.append([Hit(pid, score, rank) for rank, (pid, score) in enumerate(fused[:k], start=1)])
        return out
