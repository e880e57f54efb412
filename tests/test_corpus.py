"""Issue 15: corpora converted once to a memory-mapped Arrow file, read by row; errors name file and line."""
import gzip
import json

import numpy as np
import pandas as pd
import pytest

from rag_lab.data import load_corpus
from rag_lab.data.corpus import ARROW_FILE, Corpus, file_corpus
from rag_lab.data.records import Passage
from rag_lab.io import DataError
from rag_lab.pipeline import contexts_from_hits
from rag_lab.retrievers.base import Hit, corpus_fingerprint

PASSAGES = [Passage("p1", "Paris", "Paris is the capital of France."), Passage("p2", "", "A passage without a title."),
            Passage("7", "Zürich \"quoted\"", "Tab\tand newline\nand unicode: 東京")]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif fmt == "tsv":  # DPR's psgs_w100.tsv layout: id, text, title
        pd.DataFrame(rows)[["id", "text", "title"]].to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "parquet", "tsv"])
def test_round_trip_every_format(tmp_path, fmt):
    rows = [p.to_dict() for p in PASSAGES]
    corpus = file_corpus(write(tmp_path / f"corpus.{fmt}", rows, fmt), show_progress=False)
    assert list(corpus) == PASSAGES
    assert [corpus[i] for i in range(3)] == PASSAGES and corpus[-1] == PASSAGES[-1]
    assert corpus.take([2, 0]) == [PASSAGES[2], PASSAGES[0]]
    assert corpus.texts(0, 2) == ["Paris. Paris is the capital of France.", "A passage without a title."]
    assert corpus.fingerprint == corpus_fingerprint(PASSAGES)  # the content key every cache downstream uses
    assert list(corpus.rows_of(["7", "p1"])) == [2, 0]


def test_converted_once_then_memory_mapped(tmp_path):
    path = write(tmp_path / "c.jsonl", [p.to_dict() for p in PASSAGES], "jsonl")
    first = file_corpus(path, show_progress=False)
    (folder,) = (tmp_path / "cache" / "corpus").iterdir()
    stamp = (folder / ARROW_FILE).stat().st_mtime_ns
    again = file_corpus(path, show_progress=False)
    assert (folder / ARROW_FILE).stat().st_mtime_ns == stamp and list(again) == list(first)
    assert again.table.column("text").chunk(0).buffers()[2].address != 0  # buffers come from the mapped file
    path.write_text(json.dumps(PASSAGES[0].to_dict()) + "\n", encoding="utf-8")  # the file changed: converted again
    assert list(file_corpus(path, show_progress=False)) == [PASSAGES[0]]


def _rewrite_keeping_size_and_mtime(path, data: bytes) -> None:
    import os

    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_source_rewritten_with_size_and_mtime_kept_is_converted_again(tmp_path):
    """Issue 22: the conversion was keyed on the source's size and mtime, so new content was served the old passages."""
    from rag_lab.data import corpus as corpus_module
    from rag_lab.io import forget_verified

    rows = [p.to_dict() for p in PASSAGES]
    path = write(tmp_path / "c.jsonl", rows, "jsonl")
    assert list(file_corpus(path, show_progress=False)) == PASSAGES
    _rewrite_keeping_size_and_mtime(path, path.read_bytes().replace(b"Paris is the capital", b"Lyon! is the capital"))
    corpus_module._source_sha256.cache_clear(), forget_verified()  # a new process
    assert "Lyon! is the capital" in file_corpus(path, show_progress=False)[0].text


def test_a_damaged_arrow_conversion_is_reported_and_rebuilt(tmp_path):
    """Issue 22: passages.arrow had no checksum: a same-size edit was served."""
    from rag_lab.io import CacheRepaired, forget_verified

    path = write(tmp_path / "c.jsonl", [p.to_dict() for p in PASSAGES], "jsonl")
    file_corpus(path, show_progress=False)
    (folder,) = (tmp_path / "cache" / "corpus").iterdir()
    arrow = folder / ARROW_FILE
    data = arrow.read_bytes()
    i = data.index(b"Paris is the capital")
    _rewrite_keeping_size_and_mtime(arrow, data[:i] + b"Lyon! is the capital" + data[i + 20:])
    forget_verified()  # a new process
    with pytest.warns(CacheRepaired, match=f"{ARROW_FILE} differs"):
        again = file_corpus(path, show_progress=False)
    assert list(again) == PASSAGES


def test_chunked_conversion_matches(tmp_path, monkeypatch):
    import rag_lab.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "CHUNK_ROWS", 2)  # several record batches
    rows = [{"id": f"x{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(7)]
    corpus = file_corpus(write(tmp_path / "c.jsonl", rows, "jsonl"), show_progress=False)
    assert corpus.table.column("id").num_chunks == 4
    assert [p.id for p in corpus] == [r["id"] for r in rows] and corpus[5].text == "text 5"
    assert corpus.fingerprint == corpus_fingerprint([Passage(**r) for r in rows])


@pytest.mark.parametrize("fmt,lines,message", [
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "text": '], r"c.jsonl:2: malformed JSON"),
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "title": "T"}'], r"c.jsonl:2: corpus row has no 'text'"),
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], r"duplicate passage id 'a' \(records 0 and 1\)"),
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": null, "text": "y"}'], r"c.jsonl:2: 'id' is null or empty"),
    ("jsonl", [""], r"empty corpus"),
    ("tsv", ["id\ttext\ttitle", "1\tsome text\tT", "2\tonly two fields"], r"c.tsv:3: 2 fields, the header has 3"),
    ("tsv", ["id\tbody", "1\tx"], r"c.tsv:1: a tsv file needs a header line"),
])
def test_bad_rows_name_file_and_line_and_leave_nothing(tmp_path, fmt, lines, message):
    path = tmp_path / f"c.{fmt}"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        file_corpus(path, show_progress=False)
    leftovers = list((tmp_path / "cache" / "corpus").glob("*")) if (tmp_path / "cache" / "corpus").exists() else []
    assert not [f for f in leftovers if not f.name.startswith(".")]  # nothing half-written under a real name


def test_in_memory_corpus_and_lookups():
    corpus = Corpus.from_passages(PASSAGES)
    assert corpus.select([2, 1]).take([0])[0] == PASSAGES[2]
    assert corpus[1:].fingerprint == corpus_fingerprint(PASSAGES[1:])
    hits = [[Hit("7", 1.0, 1), Hit("p1", 0.5, 2)], [], [Hit("p2", 0.1, 1)]]
    assert contexts_from_hits(hits, corpus) == [[PASSAGES[2], PASSAGES[0]], [], [PASSAGES[1]]]
    with pytest.raises(DataError, match="not in the corpus.*'nope'"):
        corpus.rows_of(["p1", "nope"])
    with pytest.raises(IndexError):
        corpus[3]


def test_nq_mini_goes_through_arrow():
    corpus = load_corpus("nq-mini")
    assert isinstance(corpus, Corpus) and len(corpus) == 126181
    ids = np.asarray(corpus.ids_at(np.array([0, 100, 126180])))
    assert list(corpus.rows_of(list(ids))) == [0, 100, 126180]
    vital = load_corpus("nq-mini-vital")  # NQ-mini 1's corpus: the first 12,324 rows, zero-copy
    assert len(vital) == 12324 and vital.ids_at(np.array([12323])) == corpus.ids_at(np.array([12323]))


def test_a_tsv_whose_header_starts_with_a_byte_order_mark_keeps_its_ids(tmp_path):
    """Issue 22: "\\ufeffid" was not "id", so every passage got its row number as id."""
    path = write(tmp_path / "c.tsv", [p.to_dict() for p in PASSAGES], "tsv")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [p.id for p in file_corpus(path, show_progress=False)] == [p.id for p in PASSAGES]
