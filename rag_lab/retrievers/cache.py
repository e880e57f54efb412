"""On-disk cache of retrieval results per question set (index folders are cached by each retriever)."""
from __future__ import annotations

import json

from pathlib import Path
from typing import Sequence

from rag_lab.data.records import QAExample
from rag_lab.io import discard, jsonl_bytes, read_checked, stable_hash, write_checked
from rag_lab.paths import cache_dir as cache_root
from rag_lab.retrievers.base import Hit


def retriever_cache_dir(cache_dir: Path | None = None) -> Path:
    """`cache_dir` when given (tests, studies that keep their own), else `paths.cache_dir("retrieval")`."""
    return Path(cache_dir) if cache_dir is not None else cache_root("retrieval")


def questions_fingerprint(questions: Sequence[QAExample]) -> str:
    """Ids, text and answers (the answer-string oracle reads them), and the gold passage id where a
    question has one (the gold-passage oracle reads it; absent otherwise, so other keys stay)."""
    return stable_hash([[q.id, q.question, list(q.answers)] + ([q.gold_passage_id] if q.gold_passage_id else [])
                        for q in questions])


def cached_retrieve(retriever, questions: Sequence[QAExample], k: int, cache_dir: Path | None = None) -> list[list[Hit]]:
    """`retriever.retrieve(questions, k)`, saved as jsonl keyed by (retriever, questions, k) and reused."""
    key = stable_hash([retriever.fingerprint(), questions_fingerprint(questions), k])
    path = retriever_cache_dir(cache_dir) / "results" / f"{key[:24]}.jsonl"
    cached = read_checked(path)  # a damaged or re-ordered file fails its checksum: deleted and retrieved again
    if cached is not None:
        rows = [json.loads(line) for line in cached.decode("utf-8").splitlines() if line.strip()]
        if [r["id"] for r in rows] == [q.id for q in questions]:
            return [[Hit(*h) for h in row["hits"]] for row in rows]
        discard(path, "its question ids are not this question set's, in order")
    hits = retriever.retrieve(questions, k)
    write_checked(path, jsonl_bytes({"id": q.id, "hits": [[h.passage_id, h.score, h.rank] for h in hs]}
                                    for q, hs in zip(questions, hits)))
    return hits
