"""Experiment-level fine-tuning: from an `ExperimentConfig` to a trained model folder.

    model_dir, report = ensure_finetuned(cfg, seed=0)   # trains, or reuses a finished model

Train split minus a seeded dev slice (for dev EM / early stopping); RAG fine-tuning reads
the passages the configured retriever finds for each training question (cached retrieval),
with the same prompt the evaluation uses.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from rag_lab.data.records import QAExample
from rag_lab.paths import REPO_ROOT
from rag_lab.retrievers.base import stable_hash
from rag_lab.training.generator import (RUNTIME_ONLY, DevEMCallback, TrainSettings, build_sft_examples, save_model,
                                        train_generator)

FINAL = "final"


def split_train_dev(train: list[QAExample], dev_size: int, n_train: int | None, seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """A seeded dev slice held out from train, and (optionally) the first n_train of the seeded
    shuffle of the rest; both kept in file order."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    dev, pool = order[:dev_size], order[dev_size:]
    if n_train is not None:
        pool = pool[:n_train]
    return [train[i] for i in sorted(pool)], [train[i] for i in sorted(dev)]


def settings_from(cfg, seed: int) -> TrainSettings:
    t = cfg.training
    return TrainSettings(method=t.method, learning_rate=t.learning_rate, epochs=t.epochs, batch_size=t.batch_size,
                         grad_accum=t.grad_accum, lr_scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio,
                         weight_decay=t.weight_decay, eval_steps=t.eval_steps, patience=t.patience,
                         group_by_length=t.group_by_length, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
                         lora_dropout=t.lora_dropout, lora_targets=tuple(t.lora_targets), seed=seed,
                         tensorboard=t.tensorboard, max_new_tokens=cfg.generator.max_new_tokens,
                         gradient_checkpointing=t.gradient_checkpointing, save_optimizer=t.save_optimizer)


def training_record(cfg, seed: int) -> dict:
    """Everything that changes the trained weights (the checkpoint folder's identity)."""
    retriever = dataclasses.asdict(cfg.retriever) if cfg.retriever.kind != "none" else None
    training = {k: v for k, v in dataclasses.asdict(cfg.training).items() if k not in RUNTIME_ONLY}
    return {"base_model": cfg.generator.model, "generator": dataclasses.asdict(cfg.generator), "retriever": retriever,
            "data": dataclasses.asdict(cfg.data), "training": {**training, "seeds": None},
            "seed": seed, "regime": cfg.regime}


def output_dir_for(cfg, seed: int) -> Path:
    if cfg.training.output:
        base = Path(cfg.training.output)
        base = base if base.is_absolute() else REPO_ROOT / base
        return base / f"seed{seed}"
    return REPO_ROOT / "cache" / "train" / f"{cfg.name}-{stable_hash(training_record(cfg, seed))[:12]}"


def ensure_finetuned(cfg, seed: int, show_progress: bool = True) -> tuple[Path, dict]:
    """The fine-tuned model folder for (cfg, seed): reused when it exists, trained otherwise."""
    out = output_dir_for(cfg, seed)
    final = out / FINAL
    if (final / "rag_lab_training.json").exists():
        info = json.loads((final / "rag_lab_training.json").read_text(encoding="utf-8"))
        if info.get("record") == training_record(cfg, seed):
            return final, info
    info = _train(cfg, seed, out, show_progress)
    return final, info


def _train(cfg, seed: int, out: Path, show_progress: bool) -> dict:
    import torch

    from rag_lab.data import load_qa
    from rag_lab.data.subsets import corpus_for
    from rag_lab.generators import DecoderGenerator, prompt_builder
    from rag_lab.models import load_causal_lm
    from rag_lab.pipeline import contexts_from_hits

    if cfg.generator.kind != "decoder":
        raise ValueError("generator fine-tuning supports decoder-only models; the extractive reader has its own trainer")
    if cfg.generator.n_few_shot:
        raise ValueError("fine-tuned regimes train and evaluate without demonstrations: set generator.n_few_shot: 0")
    torch.manual_seed(seed)
    train, dev = split_train_dev(load_qa(cfg.data.dataset, cfg.data.train_split), cfg.training.dev_size, cfg.data.n_train, seed)
    model, tokenizer = load_causal_lm(cfg.generator.model)
    g = cfg.generator
    builder = prompt_builder(g, tokenizer)
    train_ctx = dev_ctx = None
    if cfg.retriever.kind != "none":
        from rag_lab.retrievers import build_retriever, cached_retrieve

        passages = corpus_for(cfg.data, train + dev)
        retriever = build_retriever(cfg.retriever, passages, show_progress=show_progress)
        train_ctx = contexts_from_hits(cached_retrieve(retriever, train, cfg.retriever.k), passages)
        dev_ctx = contexts_from_hits(cached_retrieve(retriever, dev, cfg.retriever.k), passages)
    def prompts(questions, contexts):
        if contexts is None:
            return [builder.closed_book(q).text for q in questions]
        return [builder.rag(q, c).text for q, c in zip(questions, contexts)]

    add_special = not builder.use_chat
    examples, skipped = build_sft_examples(prompts(train, train_ctx), [q.answers[0] for q in train], tokenizer, add_special)
    dev_examples, _ = build_sft_examples(prompts(dev, dev_ctx), [q.answers[0] for q in dev], tokenizer, add_special) if dev else ([], 0)

    def make_generator(m):
        return DecoderGenerator(m, tokenizer, builder, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                strip_prefixes=g.strip_prefixes)

    settings = settings_from(cfg, seed)
    record = training_record(cfg, seed)
    callback = DevEMCallback(make_generator, dev, dev_ctx) if dev else None
    report = train_generator(model, tokenizer, examples, out, settings, dev_examples, callback, record)
    s = settings
    # tokens the optimiser saw: the mean example length x examples per step x steps (timings.csv's 6 N T)
    train_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples) * report["global_step"] * s.batch_size * s.grad_accum
    info = {"record": record, "n_train": len(examples), "skipped_empty_answers": skipped, "n_dev": len(dev),
            "train_tokens": int(train_tokens),
            "train_seconds": report["train_seconds"], "peak_rss_gb": report["peak_rss_gb"],  # peak of the whole process so far
            "train_loss": report["train_loss"], "global_step": report["global_step"],
            "best_checkpoint": report["best_checkpoint"], "log_history": report["log_history"],
            "dev_history": report["dev_history"]}
    save_model(report["model"], tokenizer, out / FINAL, json.loads(json.dumps(info, default=str)))
    return info
