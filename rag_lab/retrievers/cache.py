"""On-disk caches for retrieval: index folders written atomically, retrieval results per question set."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from rag_lab.data.records import QAExample
from rag_lab.io import read_jsonl, write_jsonl
from rag_lab.retrievers.base import Hit, stable_hash


def retriever_cache_dir(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else `$RAG_LAB_CACHE/retrieval`, else `<repo>/cache/retrieval` (git-ignored)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from rag_lab.paths import REPO_ROOT

    root = os.environ.get("RAG_LAB_CACHE")
    return Path(root) / "retrieval" if root else REPO_ROOT / "cache" / "retrieval"


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def questions_fingerprint(questions: Sequence[QAExample]) -> str:
    return stable_hash([[q.id, q.question] for q in questions])


def cached_retrieve(retriever, questions: Sequence[QAExample], k: int, cache_dir: Path | None = None) -> list[list[Hit]]:
    """`retriever.retrieve(questions, k)`, saved as jsonl keyed by (retriever, questions, k) and reused."""
    key = stable_hash([retriever.fingerprint(), questions_fingerprint(questions), k])
    path = retriever_cache_dir(cache_dir) / "results" / f"{key[:24]}.jsonl"
    if path.exists():
        return [[Hit(*h) for h in row["hits"]] for _, row in read_jsonl(path)]
    hits = retriever.retrieve(questions, k)
    write_jsonl(path, ({"id": q.id, "hits": [[h.passage_id, h.score, h.rank] for h in hs]} for q, hs in zip(questions, hits)))
    return hits
