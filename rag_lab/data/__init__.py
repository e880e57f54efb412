"""Datasets and corpora, referred to by name through one resolver.

    load_qa("nq-mini", "eval")             # a registered name
    load_qa("path/to/questions.jsonl")     # a local jsonl / json / parquet file
    load_qa("hf:nq_open", "validation")    # a hub dataset (needs network); "owner/name" works too
    load_corpus("hf:facebook/wiki_dpr:psgs_w100.nq.no_index")   # hf:<id>:<config>

Adding a dataset is one module with `SPLITS`, `load_split(split)` (and optionally
`load_corpus()`) plus one line in `DATASETS` below.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Protocol

from rag_lab.data import nq_mini
from rag_lab.data.corpus import Corpus, file_corpus, hub_corpus
from rag_lab.data.loaders import SUFFIXES, load_hub_qa, load_qa_file
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError

FILE_SUFFIXES = (*SUFFIXES, ".csv", ".txt")  # names that are files, never hub ids


class _HubQA:
    """A registered hub QA dataset: our split names mapped to the hub's."""

    def __init__(self, hub_id: str, splits: dict[str, str]):
        self.hub_id, self.split_map = hub_id, splits
        self.SPLITS = tuple(splits)

    def load_split(self, split: str) -> list[QAExample]:
        if split not in self.split_map:
            raise DataError(f"{self.hub_id} has no split {split!r}; splits: {', '.join(self.SPLITS)}")
        return load_hub_qa(self.hub_id, self.split_map[split])


class Dataset(Protocol):
    SPLITS: tuple[str, ...]

    def load_split(self, split: str) -> list[QAExample]: ...


DATASETS: dict[str, Dataset | ModuleType] = {
    "nq-mini": nq_mini,
    # the full NQ-open (train 87,925 / dev 3,610) for users with network
    "nq-open": _HubQA("google-research-datasets/nq_open", {"train": "train", "eval": "validation"}),
}
CORPORA: dict[str, ModuleType] = {"nq-mini": nq_mini, "nq-mini-vital": nq_mini.vital}


def _hub_id(name: str) -> tuple[str, str | None] | None:
    """("owner/name", config) for 'hf:owner/name[:config]' or a bare 'owner/name'; None otherwise."""
    if name.startswith("hf:"):
        hub_id, _, config = name[3:].partition(":")
        return hub_id, config or None
    if name.endswith(FILE_SUFFIXES):  # "data/my.jsonl" is a file that is missing, never a hub dataset
        return None
    return (name, None) if name.count("/") == 1 and not Path(name).exists() else None


def load_qa(name_or_path: str, split: str = "eval") -> list[QAExample]:
    """QA examples from a registered name, a local file, or a hub dataset id. A file dataset is
    the eval split; its train split is another file, named by `split` (`data.train_split`)."""
    if name_or_path in DATASETS:
        return DATASETS[name_or_path].load_split(split)
    if Path(name_or_path).is_file():  # a file is one split: the eval set; any other split names its own file
        if split == "eval":
            return load_qa_file(name_or_path)
        if Path(split).is_file():
            return load_qa_file(split)
        raise DataError(f"data.dataset {name_or_path} is a file, so it is the eval set; split {split!r} must be a file "
                        "too: set data.train_split to the train file (demonstrations or training questions drawn from "
                        "the eval file would leak into the evaluation)")
    hub = _hub_id(name_or_path)
    if hub:
        return load_hub_qa(hub[0], split, hub[1])
    if name_or_path.endswith(FILE_SUFFIXES):
        raise DataError(f"data.dataset {name_or_path}: no such file (a relative path is read from the working directory, "
                        "or beside the config file)")
    raise DataError(
        f"unknown dataset {name_or_path!r}: not a registered name ({', '.join(DATASETS)}), "
        "not an existing file, and not a hub id ('hf:<id>[:<config>]' or 'owner/name')"
    )


def load_corpus(name_or_path: str) -> Corpus:
    """The passages of a registered corpus name, a local file, or a hub dataset id, as a memory-mapped
    Arrow `Corpus` (converted once, then read by row)."""
    if name_or_path in CORPORA:
        return CORPORA[name_or_path].load_corpus()
    if Path(name_or_path).is_file():
        return file_corpus(name_or_path)
    hub = _hub_id(name_or_path)
    if hub:
        return hub_corpus(hub[0], config=hub[1])
    if name_or_path.endswith(FILE_SUFFIXES):
        raise DataError(f"data.corpus {name_or_path}: no such file (a relative path is read from the working directory, "
                        "or beside the config file)")
    raise DataError(
        f"unknown corpus {name_or_path!r}: not a registered name ({', '.join(CORPORA)}), "
        "not an existing file, and not a hub id ('hf:<id>[:<config>]' or 'owner/name')"
    )


__all__ = ["DATASETS", "CORPORA", "Corpus", "Passage", "QAExample", "load_qa", "load_corpus", "DataError"]
