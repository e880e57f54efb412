"""NQ-mini 2: the embedded benchmark. Questions: NQ-open dev split (seeded, stratified on "has a gold
passage") into `eval` and a fine-tuning pool `train`, plus EfficientQA dev as a further pool
`efficientqa`. Corpus: the Level-4 Vital-Article leads, the NQ-annotated gold passages and real
Wikipedia articles as distractors. `nq-mini-vital` is the vital-article leads alone (the corpus of
NQ-mini 1): the same questions over a corpus that rarely holds their answers. Built by `build_nq_mini`."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from rag_lab.data.corpus import Corpus, file_corpus
from rag_lab.data.loaders import load_qa_file
from rag_lab.data.records import QAExample
from rag_lab.io import DataError
from rag_lab.paths import data_dir

NAME = "nq-mini"
SPLITS = ("train", "eval", "efficientqa")


def folder() -> Path:
    return data_dir() / "nq_mini"


def load_split(split: str) -> list[QAExample]:
    if split not in SPLITS:
        raise DataError(f"{NAME} has no split {split!r}; splits: {', '.join(SPLITS)}")
    return _load_split(str(folder()), split)


def load_corpus() -> Corpus:
    return _load_corpus(str(folder()))


def load_vital_corpus() -> Corpus:
    """`nq-mini-vital`: the corpus's first passages, the vital-article leads (manifest: n_vital_passages)."""
    manifest = folder() / "manifest.json"
    if not manifest.exists():
        raise DataError(f"{manifest}: missing; build nq-mini with `rag-lab build-data`")
    n = json.loads(manifest.read_text(encoding="utf-8"))["summary"].get("n_vital_passages")
    if not n:
        raise DataError(f"{manifest}: no summary.n_vital_passages (an NQ-mini 1 build?); rebuild with `rag-lab build-data --rebuild`")
    return _load_vital(str(folder()), n)


class _VitalCorpus:
    """The `CORPORA` entry of `nq-mini-vital`."""

    load_corpus = staticmethod(load_vital_corpus)


vital = _VitalCorpus()


# Cached per folder: notebooks and the runner ask for the same corpus many times.
@lru_cache(maxsize=4)
def _load_split(root: str, split: str) -> list[QAExample]:
    # require_scoreable off: NQ-open dev as published; 2 questions of the train pool have only answers that
    # normalise to nothing ("---", ")") and stay, so the pools match the manifest
    return load_qa_file(Path(root) / f"{split}.jsonl", require_scoreable=False)


@lru_cache(maxsize=2)
def _load_corpus(root: str) -> Corpus:
    path = Path(root) / "corpus.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path}: missing; build nq-mini with `rag-lab build-data`")
    return file_corpus(path)  # converted to Arrow once (cache/corpus), then memory-mapped


@lru_cache(maxsize=2)
def _load_vital(root: str, n: int) -> Corpus:
    whole = _load_corpus(root)
    return Corpus(whole.table.slice(0, n), source=f"{whole.source} (nq-mini-vital: its first {n} passages)")
