"""NQ-mini: the embedded benchmark (NQ-open dev as eval, EfficientQA dev as train,
10k Wikipedia Vital-Article summaries as the corpus). Built by `build_nq_mini`."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rag_lab.data.corpus import Corpus, file_corpus
from rag_lab.data.loaders import load_qa_file
from rag_lab.data.records import QAExample
from rag_lab.io import DataError
from rag_lab.paths import data_dir

NAME = "nq-mini"
SPLITS = ("train", "eval")


def folder() -> Path:
    return data_dir() / "nq_mini"


def load_split(split: str) -> list[QAExample]:
    if split not in SPLITS:
        raise DataError(f"{NAME} has no split {split!r}; splits: {', '.join(SPLITS)}")
    return _load_split(str(folder()), split)


def load_corpus() -> Corpus:
    return _load_corpus(str(folder()))


# Cached per folder: notebooks and the runner ask for the same corpus many times.
@lru_cache(maxsize=4)
def _load_split(root: str, split: str) -> list[QAExample]:
    return load_qa_file(Path(root) / f"{split}.jsonl")


@lru_cache(maxsize=2)
def _load_corpus(root: str) -> Corpus:
    path = Path(root) / "corpus.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path}: missing; build nq-mini with `rag-lab build-data`")
    return file_corpus(path)  # converted to Arrow once (cache/corpus), then memory-mapped
