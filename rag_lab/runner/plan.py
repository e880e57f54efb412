"""Which stages a regime runs and which trainer it uses (`STAGES`, from `config.REGIMES`), and what
the data stage hands the others (`RunData`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rag_lab.config import REGIMES, ExperimentConfig
from rag_lab.data import Corpus
from rag_lab.data.records import QAExample
from rag_lab.paths import cache_dir
from rag_lab.training import PassageIndex, TrainSettings, train_fid, train_generator, train_joint, train_reader


@dataclass(frozen=True)
class RunData:
    questions: list[QAExample]  # the eval questions, in file order
    train: list[QAExample]  # the train split (fine-tuning, few-shot demonstrations), else empty
    passages: Corpus | list  # the corpus the retriever searches (regimes with contexts, memory-mapped Arrow), else empty
    leak_check: dict = dataclasses.field(default_factory=dict)  # leak_guard's record, written to the run folder


GENERATOR_TRAINERS = {"fid": train_fid}  # generator.combine -> its trainer; every other reader: train_generator


def _train_decoder(cfg: ExperimentConfig, examples, ctx, settings: TrainSettings, out: Path, record: dict) -> dict:
    trainer = GENERATOR_TRAINERS.get(cfg.generator.combine, train_generator)
    return trainer(examples, ctx, settings, cfg.generator, out, record)


def _train_joint(cfg: ExperimentConfig, examples, index: PassageIndex, settings: TrainSettings, out: Path, record: dict) -> dict:
    return train_joint(examples, index, settings, cfg.generator, cfg.retriever.k, cfg.retriever.temperature, out, record,
                       refresh_cache=cache_dir("retrieval") / "refresh")


def _train_span_reader(cfg: ExperimentConfig, examples, ctx, settings: TrainSettings, out: Path, record: dict) -> dict:
    return train_reader(examples, ctx, settings, cfg.generator.model, out, record)


@dataclass(frozen=True)
class Stages:
    contexts: bool  # retrieve passages for every question (and for the training questions)
    train: Callable | None = None  # the trainer of a fine-tuned regime: (cfg, examples, contexts, settings, out, record) -> info
    # the trainer searches the dense index itself with a query encoder it trains (it gets a PassageIndex, not
    # contexts), and the eval questions are retrieved again with the trained query encoder
    trains_query_encoder: bool = False


# how each regime that trains (config.REGIMES: what every regime is) trains
TRAINERS: dict[str, Callable] = {"closed_book_ft": _train_decoder, "rag_ft": _train_decoder, "rag_e2e_ft": _train_joint,
                                 "reader": _train_span_reader}
STAGES: dict[str, Stages] = {name: Stages(contexts=r.retrieves, train=TRAINERS[name] if r.trains else None,
                                          trains_query_encoder=r.end_to_end) for name, r in REGIMES.items()}
