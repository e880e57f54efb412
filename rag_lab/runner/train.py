"""Stage 3, train (fine-tuned regimes): one model folder per seed, named by the hash of everything
that changes its weights, reused when a finished one exists."""
from __future__ import annotations

from pathlib import Path

from rag_lab.config import ExperimentConfig, key_view
from rag_lab.data.subsets import corpus_for, corpus_label
from rag_lab.io import check_replaceable, stable_hash
from rag_lab.paths import cache_dir
from rag_lab.pipeline import contexts
from rag_lab.training import FINAL, Split, TrainSettings, finished, split_train_dev
from rag_lab.training.common import RUNTIME_ONLY
from rag_lab.runner.contexts import check_k, passage_index
from rag_lab.runner.plan import RunData, STAGES


def training_record(cfg: ExperimentConfig, seed: int) -> dict:
    """Everything that changes the trained weights (the checkpoint folder's identity)."""
    retriever = key_view(cfg.retriever) if cfg.retriever.kind != "none" else None
    training = {k: v for k, v in key_view(cfg.training).items() if k not in RUNTIME_ONLY}
    return {"base_model": cfg.generator.model, "generator": key_view(cfg.generator), "retriever": retriever,
            "data": key_view(cfg.data), "training": {**training, "seeds": None},
            "seed": seed, "regime": cfg.regime}


def training_dir(cfg: ExperimentConfig, seed: int) -> Path:
    """`training.output`/seed<N> when set, else cache/train/<experiment>-<hash of the training record>."""
    if cfg.training.output:
        return Path(cfg.training.output) / f"seed{seed}"
    return cache_dir("train") / f"{cfg.name}-{stable_hash(training_record(cfg, seed))[:12]}"


def train_stage(cfg: ExperimentConfig, data: RunData, seed: int, show_progress: bool, profile: str = "default") -> tuple[Path, dict]:
    """The fine-tuned model folder for (cfg, seed) and its training info: reused when a finished
    one was made with the same training record, else trained on the train split less a seeded dev
    slice, with the passages the configured retriever finds for those questions."""
    out, record = training_dir(cfg, seed), training_record(cfg, seed)
    info = finished(out, record)
    if info is None:
        check_replaceable(out / FINAL, "training.output")  # before training, not at the rename that saves
        stages = STAGES[cfg.regime]
        examples = split_train_dev(data.train, cfg.training.dev_size, cfg.data.n_train, seed)
        ctx = None
        if stages.contexts:  # the corpus keeps the training questions' answers (smoke profiles cut it)
            passages = corpus_for(cfg.data, examples.train + examples.dev)
            check_k(cfg, passages)
            label = corpus_label(cfg.data) + (" (kept for the training questions)" if cfg.data.n_corpus else "")
            if stages.trains_query_encoder:
                ctx = passage_index(cfg.retriever, passages, show_progress)
            else:
                train_ctx, dev_ctx = contexts(cfg.retriever, passages, cfg.retriever.k, examples.train, examples.dev,
                                              show_progress=show_progress, corpus_label=label, profile=profile)
                ctx = Split(train_ctx.passages, dev_ctx.passages)
        settings = TrainSettings.from_config(cfg.training, seed=seed, max_new_tokens=cfg.generator.max_new_tokens)
        info = stages.train(cfg, examples, ctx, settings, out, record)
    return out / FINAL, info
