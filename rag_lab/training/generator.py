"""Fine-tuning a generator on question -> answer, closed-book or with retrieved passages.

Built on the Hugging Face Trainer, so the same code runs on one CPU, one GPU, or many
GPUs / nodes (`accelerate launch` / `torchrun`). The loss covers the answer tokens only:
prompt tokens are labelled -100, and for decoder-only models the LM head runs only at the
positions that predict an answer token (`logits_to_keep`; same loss, less work). Dev EM
(greedy decoding on a slice held out from train) is computed at every evaluation and drives
checkpoint selection and early stopping.

The trainer takes data, never the experiment config: the runner loads the questions, splits
them, retrieves their passages (`pipeline.contexts`) and hands them over.

    split = split_train_dev(train_questions, dev_size, n_train, seed)
    settings = TrainSettings.from_config(cfg.training, seed=seed, max_new_tokens=cfg.generator.max_new_tokens)
    info = train_generator(split, contexts, settings, cfg.generator, output_dir, record)  # -> output_dir/final

    examples, skipped = build_sft_examples(prompts, answers, tokenizer)    # the token-level primitive
    report = fit_generator(model, tokenizer, examples, output_dir, settings)
"""
from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import EarlyStoppingCallback, Trainer

from rag_lab.config import GeneratorConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.generators import DecoderGenerator, prompt_builder
from rag_lab.io import write_json
from rag_lab.models import load_causal_lm
from rag_lab.training.common import (CHECKPOINT_RULE, CONFIG_FILE, FINAL, IGNORE, DevEMCallback, ListDataset, Split,
                                     StopOnNonFiniteLoss, TrainingError, TrainSettings, finish_checkpoints, pad_collate,
                                     resume_point, save_model, timed_train, training_arguments)


def build_sft_examples(prompts: Sequence[str], answers: Sequence[str], tokenizer, add_special_tokens: bool = False) -> tuple[list[dict], int]:
    """Token ids and labels: -100 over the prompt, the answer + EOS as targets.
    An answer that tokenises to nothing is skipped and counted (second return value)."""
    if not prompts:
        raise TrainingError("empty training set: no examples to train on")
    examples, skipped = [], 0
    for prompt, answer in zip(prompts, answers):
        answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] if answer.strip() else []
        if not answer_ids:
            skipped += 1
            continue
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        target = answer_ids + [tokenizer.eos_token_id]
        examples.append({"input_ids": prompt_ids + target, "labels": [IGNORE] * len(prompt_ids) + target})
    if not examples:
        raise TrainingError(f"empty training set: all {skipped} answers tokenised to nothing")
    return examples, skipped


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is an answer token in some row of the batch: the only
    positions whose logits the loss reads (the logits at position p predict token p + 1)."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def answer_logits_collate(pad_id: int):
    """`pad_collate` plus `logits_to_keep` = `answer_positions(labels)`, so the model runs its LM head
    (49k columns for SmolLM2) only where an answer token is predicted. Pair with `answer_logits_loss`."""
    collate = pad_collate(pad_id)

    def collate_keep(batch: list[dict]) -> dict[str, torch.Tensor]:
        out = collate(batch)
        out["logits_to_keep"] = answer_positions(out["labels"])
        return out
    return collate_keep


def answer_logits_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss on logits kept at `answer_positions(labels)`: the same sum of token
    cross-entropies, over the same count, as the model's own loss on all positions (Trainer
    `compute_loss_func`: normalised by `num_items_in_batch` when the Trainer counts it)."""
    target = labels[:, answer_positions(labels) + 1].to(outputs.logits.device)
    loss = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1).float(), target.flatten(),
                                             ignore_index=IGNORE, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (target != IGNORE).sum())


def keeps_logits_at_positions(model) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (transformers' decoder-only LMs do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def padding_fraction(examples: Sequence[dict], batch_size: int, group_by_length: bool, seed: int = 0) -> float:
    """Fraction of pad tokens in an epoch of batches, with or without length grouping (for the benchmark)."""
    lengths = [len(e["input_ids"]) for e in examples]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if group_by_length:  # as LengthGroupedSampler: shuffled mega-batches of 50 batches, sorted by length inside
        mega = batch_size * 50
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


def apply_lora(model, settings: TrainSettings):
    """Wrap `model` with LoRA adapters on `lora_targets`; targets that match nothing are an error."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.lora_targets if t not in names]
    if missing:
        raise TrainingError(f"LoRA target modules {missing} match nothing in {type(model).__name__}; "
                            f"linear layers include {sorted(n for n in names if 'proj' in n or 'fc' in n)[:12]}")
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def generator_trainer(model, tokenizer, train_examples: list[dict], output_dir: Path, settings: TrainSettings,
                      dev_examples: list[dict] | None = None, dev_callback: DevEMCallback | None = None) -> Trainer:
    """The Trainer `fit_generator` runs: LoRA applied if asked, the LM head at answer positions
    when the model supports it, dev EM + early stopping when a dev callback is given."""
    answer_logits = keeps_logits_at_positions(model)  # asked before LoRA wraps the forward
    if settings.method == "lora":
        model = apply_lora(model, settings)
    callbacks = [StopOnNonFiniteLoss()]
    if dev_callback is not None:  # before early stopping, which reads the dev EM it writes
        callbacks += [dev_callback, EarlyStoppingCallback(early_stopping_patience=settings.patience)]
    return Trainer(model=model, args=training_arguments(settings, output_dir, len(dev_examples or []), dev_callback is not None),
                   train_dataset=ListDataset(train_examples), eval_dataset=ListDataset(dev_examples) if dev_examples else None,
                   data_collator=(answer_logits_collate if answer_logits else pad_collate)(tokenizer.pad_token_id),
                   compute_loss_func=answer_logits_loss if answer_logits else None, callbacks=callbacks)


def fit_generator(model, tokenizer, train_examples: list[dict], output_dir: str | Path, settings: TrainSettings,
                  dev_examples: list[dict] | None = None, dev_callback: DevEMCallback | None = None,
                  record: dict | None = None) -> dict:
    """Fine-tune `model` on token-level SFT examples; resume from the last checkpoint in `output_dir`
    when its config matches. Returns the loss / dev-EM history; the best model is left in `model`."""
    output_dir = Path(output_dir)
    record, resume = resume_point(output_dir, settings, record)
    trainer = generator_trainer(model, tokenizer, train_examples, output_dir, settings, dev_examples, dev_callback)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / CONFIG_FILE, record)
    result, cost = timed_train(trainer, resume)
    model = trainer.model
    if settings.method == "lora":
        model = model.merge_and_unload()  # plain weights: inference needs no peft
    return {"model": model, **cost, "train_loss": result.training_loss, "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history, "best_checkpoint": trainer.state.best_model_checkpoint,
            "dev_history": dev_callback.history if dev_callback else []}


def train_generator(examples: Split[QAExample], contexts: Split[list[Passage]] | None, settings: TrainSettings,
                    generator: GeneratorConfig, output_dir: str | Path, record: dict) -> dict:
    """Fine-tune `generator.model` on question (+ its passages, when `contexts` is given) -> first
    gold answer, with the prompt its evaluation uses; the best model (by dev EM) is saved to
    `output_dir/final` with its training info, which is also returned.

    `record` is everything that changes the weights (the runner's `training_record`): a rerun with
    the same record resumes from the last checkpoint in `output_dir`."""
    if generator.kind != "decoder":
        raise TrainingError("generator fine-tuning supports decoder-only models; the extractive reader has its own trainer")
    if generator.n_few_shot:
        raise TrainingError("fine-tuned regimes train and evaluate without demonstrations: set generator.n_few_shot: 0")
    output_dir = Path(output_dir)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_causal_lm(generator.model)
    builder = prompt_builder(generator, tokenizer)

    def prompts(questions, ctx):
        if ctx is None:
            return [builder.closed_book(q).text for q in questions]
        return [builder.rag(q, c).text for q, c in zip(questions, ctx)]

    train_ctx, dev_ctx = (None, None) if contexts is None else (contexts.train, contexts.dev)
    add_special, train, dev = not builder.use_chat, examples.train, examples.dev
    token_examples, skipped = build_sft_examples(prompts(train, train_ctx), [q.answers[0] for q in train], tokenizer, add_special)
    dev_examples, _ = build_sft_examples(prompts(dev, dev_ctx), [q.answers[0] for q in dev], tokenizer, add_special) if dev else ([], 0)

    def make_generator(m):
        return DecoderGenerator(m, tokenizer, builder, max_new_tokens=generator.max_new_tokens, batch_size=generator.batch_size,
                                strip_prefixes=generator.strip_prefixes)

    callback = DevEMCallback(make_generator, dev, dev_ctx) if dev else None
    report = fit_generator(model, tokenizer, token_examples, output_dir, settings, dev_examples, callback, record)
    s = settings
    # tokens the optimiser saw: the mean example length x examples per step x steps (timings.csv's 6 N T)
    train_tokens = sum(len(e["input_ids"]) for e in token_examples) / len(token_examples) * report["global_step"] * s.batch_size * s.grad_accum
    info = {"record": record, "n_train": len(token_examples), "skipped_empty_answers": skipped, "n_dev": len(dev),
            "train_tokens": int(train_tokens),
            "train_seconds": report["train_seconds"], "peak_rss_gb": report["peak_rss_gb"],  # peak of the whole process so far
            "train_loss": report["train_loss"], "global_step": report["global_step"],
            "best_checkpoint": report["best_checkpoint"], "checkpoint_rule": CHECKPOINT_RULE if dev else "the last step (no dev set)",
            "log_history": report["log_history"], "dev_history": report["dev_history"]}
    info = json.loads(json.dumps(info, default=str))
    save_model(report["model"], tokenizer, output_dir / FINAL, info)  # the main process alone; the others wait
    finish_checkpoints(output_dir, settings)
    return info
