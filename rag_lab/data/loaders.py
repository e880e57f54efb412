"""Loaders for local QA files (jsonl, json, parquet, tsv; optionally gzipped), the row readers that
corpus conversion streams (`file_rows`), and hub QA datasets through `datasets.load_dataset` (users with network)."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from rag_lab.data.records import QAExample, qa_from_row
from rag_lab.io import DataError, read_jsonl

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".tsv", ".tsv.gz")


def file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line" or "file:row N", row) for every record in a local file, streamed (a JSON
    list is the exception: it is read whole)."""
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
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=50_000):
            for row in batch.to_pylist():
                yield f"{path}: row {n}", row
                n += 1
    elif name.endswith((".tsv", ".tsv.gz")):  # DPR's psgs_w100.tsv: a header line (id, text, title), then rows
        # utf-8-sig: a byte-order mark before the header is dropped (it used to turn "id" into "\ufeffid",
        # so every passage got its row number as id)
        with (gzip.open(path, "rt", encoding="utf-8-sig", newline="") if name.endswith(".gz")
              else open(path, encoding="utf-8-sig", newline="")) as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if not header or "text" not in header:
                raise DataError(f"{path}:1: a tsv file needs a header line naming its columns (DPR: id, text, title)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields, the header has {len(header)} ({', '.join(header)})")
                yield where, dict(zip(header, row))
    else:
        raise DataError(f"{path}: unsupported file type (use one of {', '.join(SUFFIXES)})")


def load_qa_file(path: str | Path, id_prefix: str | None = None, require_scoreable: bool = True) -> list[QAExample]:
    """Load QA examples from a local file; rows without an `id` get `<prefix>-<index>`. A question none of
    whose answers survives the SQuAD normalisation ("", "the", "---") can never be scored: an error naming
    the line (`require_scoreable=False` keeps a published benchmark's few such questions as they are)."""
    from rag_lab.metrics import normalize_answer  # why: metrics imports data.records (a cycle at module level)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    prefix = id_prefix or path.name.split(".")[0]
    examples = []
    for i, (where, row) in enumerate(file_rows(path)):
        example = qa_from_row(row, where, f"{prefix}-{i}")
        if require_scoreable and not any(normalize_answer(a) for a in example.answers):
            raise DataError(f"{where}: no answer survives SQuAD normalisation (lower-case, no punctuation or articles): "
                            f"{list(example.answers)!r} can never be matched")
        examples.append(example)
    _check_unique([e.id for e in examples], path, "question")
    if not examples:
        raise DataError(f"{path}: no QA examples")
    return examples


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
