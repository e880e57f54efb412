"""Loaders for local QA files (jsonl, json, parquet, tsv; optionally gzipped), the row readers that
corpus conversion streams (`file_rows`), and hub QA datasets through `datasets.load_dataset` (users with network)."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rag_lab.data.records import QAExample, qa_from_row
from rag_lab.io import DataError, read_jsonl, text_lines
from rag_lab.metrics import normalize_answer

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".tsv", ".tsv.gz")
# why raised from csv's 131,072 characters: a real passage or article may be longer; past 64 Mi characters a field
# is an unclosed quote that swallowed the file, an error naming the line
TSV_FIELD_LIMIT = 1 << 26
csv.field_size_limit(max(csv.field_size_limit(), TSV_FIELD_LIMIT))


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
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if isinstance(data, dict) and "data" in data:  # {"data": [...]} wrapper
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i} is not an object")
            yield f"{path}: record {i}", row
    elif name.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif name.endswith((".tsv", ".tsv.gz")):  # DPR's psgs_w100.tsv: a header line (id, text, title), then rows
        yield from _tsv_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type (use one of {', '.join(SUFFIXES)})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=50_000):
            for row in batch.to_pylist():
                yield f"{path}: row {n}", row
                n += 1
    except (pa.ArrowException, OSError) as e:  # not parquet at all, or a truncated / damaged one
        raise DataError(f"{path}: not a readable parquet file after row {n} ({e}): re-download or rebuild it") from None


def _tsv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a tab-separated file with a header line; bytes that are not UTF-8, a damaged gzip
    stream or a malformed quoted field are a DataError naming the line."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        # why the BOM is dropped: it used to turn "id" into "\ufeffid", so every passage got its row number as id
        lines = (line[1:] if n == 1 and line.startswith("\ufeff") else line for n, line in text_lines(f, path))
        reader = csv.reader(lines, delimiter="\t")
        try:
            header = next(reader, None)
            if not header or "text" not in header:
                raise DataError(f"{path}:1: a tsv file needs a header line naming its columns (DPR: id, text, title)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields, the header has {len(header)} ({', '.join(header)})")
                yield where, dict(zip(header, row))
        except csv.Error as e:  # e.g. a field past TSV_FIELD_LIMIT: an unclosed quote swallowing the rest of the file
            raise DataError(f"{path}:{reader.line_num}: {e} (is a quote left open?)") from None


def load_qa_file(path: str | Path, id_prefix: str | None = None, require_scoreable: bool = True) -> list[QAExample]:
    """Load QA examples from a local file; rows without an `id` get `<prefix>-<index>`. A question none of
    whose answers survives the SQuAD normalisation ("", "the", "---") can never be scored: an error naming
    the line (`require_scoreable=False` keeps a published benchmark's few such questions as they are)."""
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
    ds = load_hub_dataset(hub_id, config, split, "data.dataset")
    prefix = f"{hub_id.split('/')[-1]}-{split}"
    return [qa_from_row(dict(row), f"{hub_id}[{split}] row {i}", f"{prefix}-{i}") for i, row in enumerate(ds)]


def load_hub_dataset(hub_id: str, config: str | None, split: str, key: str):
    """`datasets.load_dataset`, its failures (no network or offline mode, no such dataset, config or split)
    one DataError naming the config key, instead of the hub client's traceback."""
    import datasets  # why: ~2 s to import, and only hub datasets need it

    what = f"{key} hub dataset {hub_id!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except ConnectionError as e:  # HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, or no network
        raise DataError(f"{what}: the hub cannot be reached ({e}) and it is not in the local cache: give a local file "
                        f"({', '.join(SUFFIXES)}) or load it once where the hub is reachable") from None
    except (FileNotFoundError, ValueError) as e:  # DatasetNotFoundError is a FileNotFoundError; an unknown split a ValueError
        raise DataError(f"{what}: {e}") from None
