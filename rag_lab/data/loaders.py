"""Loaders for local QA files and corpora (jsonl, json, parquet; optionally gzipped)
and for hub datasets through `datasets.load_dataset` (users with network)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from rag_lab.data.records import Passage, QAExample, passage_from_row, qa_from_row
from rag_lab.io import DataError, read_jsonl

QA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line" or "file:row N", row) for every record in a local file."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, row in read_jsonl(path):
            yield f"{path}:{lineno}", row
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:  # {"data": [...]} wrapper
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i} is not an object")
            yield f"{path}: record {i}", row
    elif name.endswith(".parquet"):
        for i, row in enumerate(pd.read_parquet(path).to_dict("records")):
            row = {k: (list(v) if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in row.items()}
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unsupported file type (use one of {', '.join(QA_SUFFIXES)})")


def load_qa_file(path: str | Path, id_prefix: str | None = None) -> list[QAExample]:
    """Load QA examples from a local file; rows without an `id` get `<prefix>-<index>`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    prefix = id_prefix or path.name.split(".")[0]
    examples = [qa_from_row(row, where, f"{prefix}-{i}") for i, (where, row) in enumerate(_rows(path))]
    _check_unique([e.id for e in examples], path, "question")
    if not examples:
        raise DataError(f"{path}: no QA examples")
    return examples


def load_corpus_file(path: str | Path) -> list[Passage]:
    """Load passages (`id`, `title`, `text`) from a local file; duplicate ids and empty corpora are errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    passages = [passage_from_row(row, where, str(i)) for i, (where, row) in enumerate(_rows(path))]
    if not passages:
        raise DataError(f"{path}: empty corpus")
    _check_unique([p.id for p in passages], path, "passage")
    return passages


def _check_unique(ids: list[str], path: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for i, id_ in enumerate(ids):
        if id_ in seen:
            raise DataError(f"{path}: duplicate {what} id {id_!r} (records {seen[id_]} and {i})")
        seen[id_] = i


def load_hub_qa(hub_id: str, split: str, config: str | None = None) -> list[QAExample]:
    """Load a QA split from the Hugging Face hub (needs network), e.g. ("nq_open", "validation")."""
    import datasets  # why: ~2 s to import, and only hub datasets need it

    ds = datasets.load_dataset(hub_id, config, split=split)
    prefix = f"{hub_id.split('/')[-1]}-{split}"
    return [qa_from_row(dict(row), f"{hub_id}[{split}] row {i}", f"{prefix}-{i}") for i, row in enumerate(ds)]


def load_hub_corpus(hub_id: str, split: str = "train", config: str | None = None) -> list[Passage]:
    """Load passages from a hub dataset with `text` (and `title`, `id`) columns (needs network)."""
    import datasets  # why: ~2 s to import, and only hub datasets need it

    ds = datasets.load_dataset(hub_id, config, split=split)
    return [passage_from_row(dict(row), f"{hub_id}[{split}] row {i}", str(i)) for i, row in enumerate(ds)]
