"""Stage 2, contexts: the top-k passages of every eval question through `pipeline.contexts`; the
fixed passage index an end-to-end trainer searches, and the eval questions retrieved again with
the query encoder it trained."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from rag_lab.config import ConfigError, ExperimentConfig, RetrieverConfig
from rag_lab.data.records import Passage
from rag_lab.data.subsets import corpus_label
from rag_lab.pipeline import Contexts, contexts, dense_index
from rag_lab.training import QUERY_ENCODER, PassageIndex
from rag_lab.runner.plan import RunData, STAGES


def check_k(cfg: ExperimentConfig, passages) -> None:
    """retriever.k no larger than the corpus it searches (FAISS pads with -1, bm25s refuses: say it first)."""
    if cfg.retriever.k > len(passages):
        raise ConfigError(f"retriever.k = {cfg.retriever.k} is larger than the corpus ({len(passages)} passages, "
                          f"{corpus_label(cfg.data)}): lower retriever.k or raise data.n_corpus")


def contexts_stage(cfg: ExperimentConfig, data: RunData, show_progress: bool, profile: str = "default") -> Contexts | None:
    """The top-k passages of every eval question (None for closed-book regimes)."""
    if not STAGES[cfg.regime].contexts:
        return None
    check_k(cfg, data.passages)
    (ctx,) = contexts(cfg.retriever, data.passages, cfg.retriever.k, data.questions, show_progress=show_progress,
                      corpus_label=corpus_label(cfg.data), profile=profile)
    return ctx


def passage_index(retriever_cfg: RetrieverConfig, passages: Sequence[Passage], show_progress: bool = True) -> PassageIndex:
    """What an end-to-end trainer searches: the fixed passage embeddings and index of the dense
    retriever `retriever_cfg` describes (cached as for evaluation) and the encoder its query side starts from."""
    dense = dense_index(retriever_cfg, passages, show_progress=show_progress)
    return PassageIndex(dense.passages, dense.embeddings, dense.index, retriever_cfg.query_encoder or retriever_cfg.encoder,
                        retriever_cfg.query_prefix, retriever_cfg.passage_prefix, retriever_cfg.max_length)


def trained_query_contexts(cfg: ExperimentConfig, data: RunData, final: Path, show_progress: bool, profile: str) -> Contexts:
    """The eval questions' top-k with the query encoder trained end to end (`final/query_encoder`) over
    the same fixed passage embeddings."""
    retriever = dataclasses.replace(cfg.retriever, query_encoder=str(final / QUERY_ENCODER))
    (ctx,) = contexts(retriever, data.passages, cfg.retriever.k, data.questions, show_progress=show_progress,
                      corpus_label=corpus_label(cfg.data), profile=profile)
    return ctx


def doc_logits(cfg: ExperimentConfig, ctx: Contexts | None) -> list[list[float]] | None:
    """log p_eta(z|x) up to a constant: each hit's score / `retriever.temperature` (readers that weigh passages)."""
    return None if ctx is None else [[h.score / cfg.retriever.temperature for h in row] for row in ctx.hits]
