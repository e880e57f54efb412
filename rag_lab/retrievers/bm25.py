"""BM25 with bm25s: sparse-matrix scoring, an index built in bounded memory, saved once, memory-mapped.

The index is bm25s's own (its CSC score matrix and vocabulary files, loaded with
`bm25s.BM25.load(mmap=True)`), but built here chunk by chunk (`build_bm25_index`): the corpus is
tokenised `chunk_rows` passages at a time by `bm25s.tokenize`, each chunk's (passage, token, tf)
triples go to disk, and the score matrix is filled column by column into memory-mapped files. Peak
memory is one chunk plus the vocabulary, not the corpus; the matrix equals `bm25s.BM25.index`'s
(tested), so a corpus gives the same scores either way.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import Stemmer
import bm25s
import numpy as np
from tqdm.auto import tqdm

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import atomic_dir, folder_is_intact, stable_hash, write_manifest
from rag_lab.retrievers.base import Hit, RetrieverSettingError, check_k, check_questions, hits_from_arrays
from rag_lab.retrievers.cache import retriever_cache_dir

CHUNK_ROWS = 100_000  # passages tokenised at a time while building
MAP_BYTES = 1 << 30  # the score matrix is filled in passes over its columns, each mapping at most this much


class BM25Retriever:
    """Okapi BM25 (Lucene variant) over `passage_text`; stopwords and stemming configurable."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75,
                 stopwords: str | None = "en", stemmer: str | None = "english",
                 cache_dir: Path | None = None, show_progress: bool = True, chunk_rows: int = CHUNK_ROWS):
        if not len(passages):
            raise ValueError("BM25Retriever needs a non-empty corpus")
        self.passages: Corpus = as_corpus(passages)
        self.chunk_rows = chunk_rows
        self.params = {"k1": k1, "b": b, "stopwords": stopwords, "stemmer": stemmer}
        self.show_progress = show_progress
        self._stemmer = _make_stemmer(stemmer)
        _check_stopwords(stopwords)
        self._corpus_hash = self.passages.fingerprint
        self.cache_hit = False
        self.build: dict | None = None  # {"kind", "seconds"} when this process built the index (timings.csv)
        self.index = self._load_or_build(cache_dir)

    def fingerprint(self) -> str:
        return stable_hash({"kind": "bm25", **self.params, "corpus": self._corpus_hash, "bm25s": bm25s.__version__})

    def tokenize(self, texts: list[str], show_progress: bool = False) -> list[list[str]]:
        """The tokens BM25 sees (also what the rank_bm25 benchmark is given)."""
        return bm25s.tokenize(texts, stopwords=self.params["stopwords"] or [], stemmer=self._stemmer,
                              return_ids=False, show_progress=show_progress)

    def _load_or_build(self, cache_dir: Path | None) -> bm25s.BM25:
        folder = retriever_cache_dir(cache_dir) / f"bm25-{self.fingerprint()[:16]}"
        if folder_is_intact(folder):  # every file checked against the manifest; a damaged index is rebuilt
            self.cache_hit = True
        else:
            t0 = time.perf_counter()
            with atomic_dir(folder) as tmp:
                build_bm25_index(self.passages, tmp, self.tokenize, self.params["k1"], self.params["b"],
                                 self.chunk_rows, self.show_progress)
                write_manifest(tmp)
            self.build = {"kind": "bm25", "seconds": time.perf_counter() - t0, "note": f"{len(self.passages)} passages"}
        # memory-mapped: the score matrix stays on disk, pages are read as queries touch them
        return bm25s.BM25.load(str(folder), mmap=True, show_progress=False)

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = min(check_k(k), len(self.passages))  # k beyond the corpus: every passage, ranked
        tokens = self.tokenize(check_questions(questions))
        # a query whose every token is a stopword / unknown scores 0 everywhere: still k hits
        indices, scores = self.index.retrieve(tokens, k=k, show_progress=self.show_progress, n_threads=0)
        return hits_from_arrays(self.passages, np.asarray(indices), np.asarray(scores))


def build_bm25_index(corpus: Corpus, folder: Path, tokenize, k1: float, b: float, chunk_rows: int = CHUNK_ROWS,
                     show_progress: bool = True, map_bytes: int = MAP_BYTES) -> None:
    """Write bm25s's index files (Lucene BM25, float32 scores) for `corpus` into `folder` in bounded memory.

    Pass 1 tokenises `chunk_rows` passages at a time and spills each chunk's sorted (passage, token)
    pairs with their term frequency to a scratch folder, counting document frequencies and lengths.
    Pass 2 computes each pair's score exactly as `bm25s` does (float64, stored as float32) and
    scatters it into its token's column of memory-mapped CSC arrays, in passes over column ranges of
    at most `map_bytes` of output (so the mapped pages stay bounded too). Same arrays as
    `bm25s.BM25.index` up to the order of the vocabulary's columns."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bm25-chunks-", dir=folder.parent))
    try:
        vocab: dict[str, int] = {}
        df = np.zeros(0, dtype=np.int64)
        n_docs, total_len, chunks = len(corpus), 0, []
        bar = tqdm(total=n_docs, desc="BM25 tokenise", unit=" passages", disable=not show_progress, mininterval=2)
        for c, start in enumerate(range(0, n_docs, chunk_rows)):
            tokens = tokenize(corpus.texts(start, min(start + chunk_rows, n_docs)))
            lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
            flat = np.fromiter((vocab.setdefault(t, len(vocab)) for doc in tokens for t in doc), dtype=np.int64,
                               count=int(lengths.sum()))
            doc = np.repeat(np.arange(len(tokens), dtype=np.int64), lengths)
            pairs, tf = np.unique((doc << 32) | flat, return_counts=True)  # sorted by (passage, token)
            tok = (pairs & 0xFFFFFFFF).astype(np.int32)
            df = np.concatenate([df, np.zeros(len(vocab) - len(df), dtype=np.int64)])
            df += np.bincount(tok, minlength=len(vocab))
            np.save(scratch / f"{c}-doc.npy", (pairs >> 32).astype(np.int32) + np.int32(start))
            np.save(scratch / f"{c}-tok.npy", tok)
            np.save(scratch / f"{c}-tf.npy", tf.astype(np.float32))
            np.save(scratch / f"{c}-len.npy", lengths)
            total_len += int(lengths.sum())
            chunks.append((c, start))
            bar.update(len(tokens))
            del tokens, flat, doc, pairs
        bar.close()
        n_vocab, nnz = len(vocab), int(df.sum())
        avg_len = np.float64(total_len / n_docs)  # = numpy's mean of the lengths (an exact integer sum, divided)
        # bm25s's Lucene idf, computed as it does (math.log in float64, stored as float32)
        idf = np.array([math.log(1 + (n_docs - d + 0.5) / (d + 0.5)) if d else 0.0 for d in df.tolist()], dtype=np.float32)
        indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)  # the dtypes bm25s writes
        index_dtype = np.int32 if n_docs < 2**31 else np.int64
        np.lib.format.open_memmap(folder / "data.csc.index.npy", "w+", np.float32, (nnz,)).flush()
        np.lib.format.open_memmap(folder / "indices.csc.index.npy", "w+", index_dtype, (nnz,)).flush()
        cursor = indptr[:-1].astype(np.int64)
        # The columns in passes of at most `map_bytes` of output each: every chunk scatters over all the
        # columns, so one pass would keep every page of both arrays mapped (resident) at once.
        n_pass = max(1, -(-nnz * 8 // map_bytes))
        cuts = np.searchsorted(indptr, np.linspace(0, nnz, n_pass + 1)[1:-1]).tolist()
        for lo, hi in zip([0] + cuts, cuts + [n_vocab]):
            data = np.load(folder / "data.csc.index.npy", mmap_mode="r+")
            indices = np.load(folder / "indices.csc.index.npy", mmap_mode="r+")
            for c, start in tqdm(chunks, desc=f"BM25 scores, columns {lo}-{hi}", disable=not show_progress, mininterval=2):
                doc, tok, tf = (np.load(scratch / f"{c}-{name}.npy") for name in ("doc", "tok", "tf"))
                keep = (tok >= lo) & (tok < hi)
                doc, tok, tf = doc[keep], tok[keep], tf[keep]
                l_d = np.load(scratch / f"{c}-len.npy")[doc - start]
                tfc = tf / (k1 * ((1 - b) + b * l_d / avg_len) + tf)  # bm25s._score_tfc_robertson, float64
                scores = (idf[tok] * tfc).astype(np.float32)
                order = np.argsort(tok, kind="stable")  # column by column, passages ascending within a column
                tok_sorted = tok[order]
                uniq, first, counts = np.unique(tok_sorted, return_index=True, return_counts=True)
                pos = cursor[tok_sorted] + (np.arange(len(order)) - np.repeat(first, counts))
                data[pos], indices[pos] = scores[order], doc[order]
                cursor[uniq] += counts
            data.flush(), indices.flush()
            del data, indices  # unmapped: the pages written in this pass leave the process
        np.save(folder / "indptr.csc.index.npy", indptr)
        vocab[""] = n_vocab  # bm25s's empty token: scores a query with no known token as 0 everywhere
        (folder / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        params = dict(k1=k1, b=b, delta=0.5, method="lucene", idf_method="lucene", dtype="float32",
                      int_dtype="int32", num_docs=n_docs, version=bm25s.__version__, backend="numpy")
        (folder / "params.index.json").write_text(json.dumps(params, indent=4), encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_stopwords(name: str | None) -> None:
    """bm25s's stopword names, checked before the corpus is tokenised (it raised at the first passage)."""
    if name is None:
        return
    try:
        bm25s.tokenize(["a"], stopwords=name, return_ids=False, show_progress=False)
    except ValueError as e:
        raise RetrieverSettingError(f"retriever.stopwords {name!r}: {str(e).split('. Please')[0]} (or null: keep every word)") from None


def _make_stemmer(language: str | None):
    if language is None:
        return None

    try:
        return Stemmer.Stemmer(language).stemWords
    except KeyError:
        raise RetrieverSettingError(f"retriever.stemmer {language!r}: unknown language; PyStemmer knows "
                                    f"{', '.join(Stemmer.algorithms())} (or null: no stemming)") from None
