"""A corpus as an Arrow file on disk, memory-mapped: passages are read by row, never all held as objects.

    corpus = load_corpus("nq-mini")          # converted once into cache/corpus/, then memory-mapped
    len(corpus), corpus[17]                   # a Passage, read from the mapped file
    corpus.texts(0, 4096)                     # `passage_text` of a row range (what encoders and BM25 read)
    corpus.rows_of(["Eiffel Tower#0"])        # row numbers of passage ids
    Corpus.from_passages(passages)            # an in-memory corpus (tests, sentence windows, subsets)

Local jsonl / jsonl.gz / json / parquet / tsv files and hub datasets are converted by streaming
them in chunks (`convert_corpus`): every row is checked as it is read (errors name the file and
line), ids must be unique, and the content fingerprint — the same sha256 `corpus_fingerprint`
gives, so every cache key downstream is unchanged — is computed on the way and kept in the
manifest. A converted copy is found again by its source's path, size and modification time.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from rag_lab.data.loaders import file_rows, load_hub_dataset
from rag_lab.data.records import Passage, passage_from_row
from rag_lab.io import DataError, atomic_dir, read_jsonl, sha256_file, stable_hash, verified_folder, write_json, write_manifest
from rag_lab.paths import cache_dir

ARROW_FILE, INFO_FILE = "passages.arrow", "corpus.json"
FORMAT = 1  # bump when the converted layout changes: old conversions are then redone
CHUNK_ROWS = 50_000  # rows per record batch while converting (bounded memory)
SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


def _line(p_id: str, title: str, text: str, _q=json.encoder.encode_basestring) -> str:
    """One passage's line of the content fingerprint: `[id, title, text]` as json.dumps writes it."""
    return f"[{_q(p_id)}, {_q(title)}, {_q(text)}]\n"


class Corpus(Sequence[Passage]):
    """Passages in an Arrow table (memory-mapped when opened from disk), addressed by row."""

    def __init__(self, table: pa.Table, fingerprint: str | None = None, source: str = "", folder: Path | None = None):
        self.table = table.select(["id", "title", "text"])
        self.source = source
        self.folder = folder  # the converted folder when memory-mapped from disk (another process can open it)
        self._fingerprint = fingerprint
        self._ids: pa.Array | None = None

    # ---- construction
    @classmethod
    def open(cls, folder: str | Path) -> "Corpus":
        """The converted corpus in `folder`, memory-mapped (nothing is read until a row is)."""
        folder = Path(folder)
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        table = pa.ipc.open_file(pa.memory_map(str(folder / ARROW_FILE))).read_all()
        if table.num_rows != info["rows"]:
            raise DataError(f"{folder}: {table.num_rows} rows but its {INFO_FILE} says {info['rows']}; delete the folder")
        return cls(table, info["fingerprint"], info.get("source", str(folder)), folder)

    @classmethod
    def from_passages(cls, passages: Iterable[Passage], source: str = "in memory") -> "Corpus":
        rows = list(passages)
        table = pa.table({"id": [p.id for p in rows], "title": [p.title for p in rows], "text": [p.text for p in rows]},
                         schema=SCHEMA)
        return cls(table, source=source)

    # ---- the Sequence interface
    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(*i.indices(len(self))))
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"passage row {i} out of range for a corpus of {len(self)}")
        row = self.table.slice(i, 1).to_pylist()[0]
        return Passage(row["id"], row["title"], row["text"])

    def __iter__(self) -> Iterator[Passage]:
        for batch in self.table.to_batches(max_chunksize=CHUNK_ROWS):
            ids, titles, texts = (batch.column(c).to_pylist() for c in ("id", "title", "text"))
            yield from map(Passage, ids, titles, texts)

    def __repr__(self) -> str:
        return f"Corpus({len(self)} passages from {self.source})"

    # ---- reading by row
    def take(self, rows: Sequence[int]) -> list[Passage]:
        """The passages at `rows`, in that order."""
        part = self.table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return list(map(Passage, *(part.column(c).to_pylist() for c in ("id", "title", "text"))))

    def select(self, rows: Iterable[int]) -> "Corpus":
        """A corpus of the passages at `rows` (in that order)."""
        return Corpus(self.table.take(pa.array(np.fromiter(rows, dtype=np.int64))), source=f"{self.source} (subset)")

    def texts(self, start: int = 0, stop: int | None = None, prefix: str = "") -> list[str]:
        """`prefix + passage_text(p)` of rows [start, stop): what the encoders and BM25 read."""
        part = self.table.slice(start, (len(self) if stop is None else stop) - start)
        titles, texts = part.column("title").to_pylist(), part.column("text").to_pylist()
        return [prefix + (f"{t}. {x}" if t else x) for t, x in zip(titles, texts)]

    def ids_at(self, rows: np.ndarray) -> list[str]:
        return self.table.column("id").take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of passage ids (a hash lookup in Arrow; an unknown id is an error)."""
        if self._ids is None:  # one contiguous id array, kept: lookups repeat (every question set)
            self._ids = self.table.column("id").combine_chunks()
        rows = pc.index_in(pa.array(list(ids), type=pa.string()), value_set=self._ids)
        if rows.null_count:
            missing = [i for i, r in zip(ids, rows.to_pylist()) if r is None]
            raise DataError(f"passage id(s) not in the corpus ({self.source}): {', '.join(map(repr, missing[:5]))}")
        return rows.to_numpy(zero_copy_only=False).astype(np.int64)

    @property
    def fingerprint(self) -> str:
        """sha256 of every passage's `[id, title, text]` JSON line: the corpus's content key."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for batch in self.table.to_batches(max_chunksize=CHUNK_ROWS):
                cols = (batch.column(c).to_pylist() for c in ("id", "title", "text"))
                h.update("".join(map(_line, *cols)).encode("utf-8"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def as_corpus(passages: Sequence[Passage] | Corpus) -> Corpus:
    """A `Corpus` as is; a list of passages as an in-memory one."""
    return passages if isinstance(passages, Corpus) else Corpus.from_passages(passages)


# ---------------------------------------------------------------- conversion

def _hub_rows(hub_id: str, config: str | None, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    ds = load_hub_dataset(hub_id, config, split, "data.corpus")  # itself memory-mapped Arrow in the hub cache
    for i, row in enumerate(ds):
        yield f"{hub_id}[{split}] row {i}", dict(row)


def convert_corpus(rows: Iterable[tuple[str, dict[str, Any]]], folder: Path, source: str,
                   show_progress: bool = True) -> Corpus:
    """Write `rows` (("where", raw row) pairs) as an Arrow corpus in `folder`, chunk by chunk.

    Each row goes through `passage_from_row` (a bad row is an error naming where it is); a row
    without an `id` gets its row number; duplicate ids and an empty corpus are errors. The folder
    appears only when complete."""
    h, n = hashlib.sha256(), 0
    with atomic_dir(folder) as tmp:
        with pa.OSFile(str(tmp / ARROW_FILE), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            ids: list[str] = []
            titles: list[str] = []
            texts: list[str] = []

            def flush():
                h.update("".join(map(_line, ids, titles, texts)).encode("utf-8"))
                writer.write_batch(pa.record_batch([ids, titles, texts], schema=SCHEMA))
                ids.clear(), titles.clear(), texts.clear()

            for where, row in tqdm(rows, desc=f"corpus -> Arrow ({Path(source).name})", unit=" passages",
                                   disable=not show_progress, mininterval=2):
                p = passage_from_row(row, where, str(n))
                ids.append(p.id), titles.append(p.title), texts.append(p.text)
                n += 1
                if len(ids) == CHUNK_ROWS:
                    flush()
            if ids:
                flush()
        if n == 0:
            raise DataError(f"{source}: empty corpus")
        table = pa.ipc.open_file(pa.memory_map(str(tmp / ARROW_FILE))).read_all()
        _check_unique_ids(table.column("id"), source)
        write_json(tmp / INFO_FILE, {"rows": n, "fingerprint": h.hexdigest(), "source": source, "format": FORMAT})
        del table
        write_manifest(tmp)  # size and sha256 of passages.arrow and corpus.json: checked at each process's first use
    return Corpus.open(folder)


def _check_unique_ids(ids: pa.ChunkedArray, source: str) -> None:
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        where = np.flatnonzero(pc.equal(ids, first).to_numpy(zero_copy_only=False))
        raise DataError(f"{source}: duplicate passage id {first!r} (records {where[0]} and {where[1]}"
                        + (f"; {len(dup) - 1} more duplicated ids" if len(dup) > 1 else "") + ")")


def corpus_folder(key: dict) -> Path:
    return cache_dir("corpus") / stable_hash({**key, "format": FORMAT})[:20]


def file_corpus(path: str | Path, show_progress: bool = True) -> Corpus:
    """A local corpus file as a memory-mapped Arrow corpus, converted on first use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    st = path.stat()
    # the source's content, not its size and mtime, names the conversion: a file rewritten with both kept
    # is converted again (one sha256 pass over the source per process)
    folder = corpus_folder({"file": str(path.resolve()), "sha256": _source_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)})
    if verified_folder(folder):  # every file against its manifest at this process's first use; damaged: rebuilt
        return Corpus.open(folder)
    return convert_corpus(file_rows(path), folder, str(path), show_progress)


@functools.lru_cache(maxsize=64)
def _source_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def hub_corpus(hub_id: str, config: str | None = None, split: str = "train", show_progress: bool = True) -> Corpus:
    """A hub dataset with `text` (and `title`, `id`) columns as an Arrow corpus (needs network once)."""
    folder = corpus_folder({"hub": hub_id, "config": config, "split": split})
    if verified_folder(folder):
        return Corpus.open(folder)
    return convert_corpus(_hub_rows(hub_id, config, split), folder, f"hf:{hub_id}" + (f":{config}" if config else ""),
                          show_progress)
