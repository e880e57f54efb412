"""On-disk cache of retrieval results per question set (index folders are cached by each retriever)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rag_lab.data.records import QAExample
from rag_lab.io import read_jsonl, stable_hash, write_jsonl
from rag_lab.paths import cache_dir as cache_root
from rag_lab.retrievers.base import Hit


def retriever_cache_dir(cache_dir: Path | None = None) -> Path:
    """`cache_dir` when given (tests, studies that keep their own), else `paths.cache_dir("retrieval")`."""
    return Path(cache_dir) if cache_dir is not None else cache_root("retrieval")


def questions_fingerprint(questions: Sequence[QAExample]) -> str:
    """Ids, text and answers: the oracle retriever's hits depend on the answers too."""
    return stable_hash([[q.id, q.question, list(q.answers)] for q in questions])


def cached_retrieve(retriever, questions: Sequence[QAExample], k: int, cache_dir: Path | None = None) -> list[list[Hit]]:
    """`retriever.retrieve(questions, k)`, saved as jsonl keyed by (retriever, questions, k) and reused."""
    key = stable_hash([retriever.fingerprint(), questions_fingerprint(questions), k])
    path = retriever_cache_dir(cache_dir) / "results" / f"{key[:24]}.jsonl"
    if path.exists():
        return [[Hit(*h) for h in row["hits"]] for _, row in read_jsonl(path)]
    hits = retriever.retrieve(questions, k)
    write_jsonl(path, ({"id": q.id, "hits": [[h.passage_id, h.score, h.rank] for h in hs]} for q, hs in zip(questions, hits)))
    return hits
