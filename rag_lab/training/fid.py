"""Fusion-in-Decoder fine-tuning (Izacard & Grave 2021) of an encoder-decoder reader.

Each (question, passage) pair is encoded alone and the decoder attends over all of them at once,
so the encoder's cost grows linearly in k (a concatenated prompt grows quadratically in attention).
The weights are the plain model's: the result saves and loads as an ordinary seq2seq checkpoint,
read the FiD way by `generators.FiDGenerator` (`generator.combine: fid`).

    info = train_fid(split, contexts, settings, cfg.generator, out, record)   # -> out/final
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import EarlyStoppingCallback

from rag_lab.config import GeneratorConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.generators import FiDGenerator, prompt_builder
from rag_lab.generators.fid import FiDModel, fid_batch
from rag_lab.io import write_json
from rag_lab.models import load_seq2seq_lm
from rag_lab.training.common import (CONFIG_FILE, IGNORE, DevEMCallback, ListDataset, ModuleTrainer, Split, StopOnNonFiniteLoss,
                                     TrainingError, TrainSettings, fit_and_save, resume_point, training_arguments)


def fid_collate(tokenizer):
    """[b, k, L] passage inputs and [b, m] answer labels (-100 on padding)."""
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        out = fid_batch(tokenizer, [b["texts"] for b in batch])
        width = max(len(b["target"]) for b in batch)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, :len(b["target"])] = torch.tensor(b["target"])
        return {**out, "labels": labels}
    return collate


def train_fid(examples: Split[QAExample], contexts: Split[list[Passage]], settings: TrainSettings, generator: GeneratorConfig,
              output_dir: str | Path, record: dict) -> dict:
    """Fine-tune `generator.model` (encoder-decoder) the FiD way on question + its passages -> first gold
    answer; the best model by dev EM is saved to `output_dir/final` with its training info."""
    if generator.kind != "seq2seq":
        raise TrainingError(f"Fusion-in-Decoder needs an encoder-decoder reader (generator.kind: seq2seq), not {generator.kind!r}")
    if contexts is None:
        raise TrainingError("Fusion-in-Decoder reads passages: it needs the training questions' contexts")
    if settings.method != "full":
        raise TrainingError("FiD training supports training.method: full")
    output_dir = Path(output_dir)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_seq2seq_lm(generator.model)
    builder = prompt_builder(generator, tokenizer)  # plain text: generator.kind is seq2seq

    def rows(questions, ctx):
        out = []
        for q, passages in zip(questions, ctx):
            target = tokenizer(q.answers[0].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            texts = [builder.rag(q, [p]).text for p in passages] or [builder.closed_book(q).text]
            out.append({"texts": texts, "target": target})
        return out

    def make_generator(m):
        return FiDGenerator(m.model, tokenizer, builder, max_new_tokens=generator.max_new_tokens, batch_size=generator.batch_size,
                            strip_prefixes=generator.strip_prefixes)

    dev = examples.dev
    callback = DevEMCallback(make_generator, dev, contexts.dev) if dev else None
    record, resume = resume_point(output_dir, settings, record)
    args = training_arguments(settings, output_dir, len(dev), dev_em=callback is not None)
    args.train_sampling_strategy = "random"
    callbacks = [StopOnNonFiniteLoss()] + ([callback, EarlyStoppingCallback(early_stopping_patience=settings.patience)] if callback else [])
    trainer = ModuleTrainer(model=FiDModel(model), args=args, train_dataset=ListDataset(rows(examples.train, contexts.train)),
                         eval_dataset=ListDataset(rows(dev, contexts.dev)) if dev else None, data_collator=fid_collate(tokenizer),
                         callbacks=callbacks)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / CONFIG_FILE, record)
    def write(tmp: Path) -> None:
        trainer.model.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return fit_and_save(trainer, resume, output_dir, settings, write, lambda result, cost: {
        "record": record, "n_train": len(examples.train), "n_dev": len(dev), **cost, "train_loss": result.training_loss,
        "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint,
        "log_history": trainer.state.log_history, "dev_history": callback.history if callback else []})
