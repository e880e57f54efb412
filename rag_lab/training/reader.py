"""Training the extractive reader (DPR-style) by distant supervision.

NQ-open gives answer strings, not spans, so — as DPR's reader does — every retrieved passage
in which a gold answer occurs is a positive, labelled with the token span of that occurrence,
and the highest-ranked passages with no answer are negatives, labelled with the [CLS] position
(as Hugging Face's run_qa labels unanswerable features). Questions whose passages hold no
answer teach nothing and are skipped (counted).

    info = train_reader(split, contexts, settings, "all-minilm-l6-v2", out, record)   # questions + their passages
    reader = ExtractiveReader(out / "final")                                        # trained head: no warning

    features, stats = build_reader_features(train, train_contexts, tokenizer)       # the primitives below it
    report = fit_reader("all-minilm-l6-v2", features, dev, dev_contexts, out, settings, record)

One feature = one (question, passage) pair, read exactly as `ExtractiveReader` reads it:
the question, then `passage_text(p)` = "title. text", truncated to `max_length` tokens
(passage side only). The Trainer conventions (dev EM drives checkpoint choice and early
stopping, resume by config, the guarded final save) are those of `rag_lab.training.common`.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer

from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.generators.extractive import ExtractiveReader, load_qa_model
from rag_lab.io import write_json
from rag_lab.metrics import AnswerInPassage
from rag_lab.models import resolve_model
from rag_lab.training.common import (CHECKPOINT_RULE, CONFIG_FILE, FINAL, DevEMCallback, ListDataset, Split, StopOnNonFiniteLoss,
                                     TrainingError, TrainSettings, fit_and_save, resume_point, training_arguments)

# The reader at evaluation time (`build_generator` -> ExtractiveReader) reads 384 tokens; train on the same window.
MAX_LENGTH = 384
NEGATIVES_PER_QUESTION = 1


# ---------------------------------------------------------------- distant supervision

def find_answer_spans(answers: Sequence[str], context: str) -> list[tuple[int, int]]:
    """(start_char, end_char) of the first occurrence of each gold answer in `context`, end exclusive,
    sorted by position (then by end), duplicates removed.

    Case-insensitive, at word boundaries ("1" does not match inside "1972"), and any run of white
    space in an answer matches any run in the context. Blank answers match nothing.
    """
    if isinstance(answers, str):  # a bare string would be searched character by character
        raise TypeError("answers must be a sequence of strings, not a single string")
    spans = set()
    for answer in answers:
        words = answer.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
        match = re.search(pattern, context, flags=re.IGNORECASE)
        if match:
            spans.add(match.span())
    return sorted(spans)


def _token_span(offsets, sequence_ids, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token indices (inclusive) of the passage tokens covering [start_char, end_char); None if
    truncation cut the span off. Offsets of passage tokens index into the passage string."""
    context = [t for t, sid in enumerate(sequence_ids) if sid == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = max(t for t in context if offsets[t][0] <= start_char)
    end = min(t for t in context if offsets[t][1] >= end_char)
    return start, end


def build_reader_features(examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]], tokenizer,
                          max_length: int = MAX_LENGTH, negatives_per_question: int = NEGATIVES_PER_QUESTION
                          ) -> tuple[list[dict], dict]:
    """Span-labelled features from each question's retrieved passages, and counts of what was kept.

    Positive: a passage holding a gold answer (`find_answer_spans`), labelled with its first span
    that survives truncation; a positive whose spans were all truncated away is dropped
    (`dropped_truncated`). Negatives: the `negatives_per_question` highest-ranked passages with
    no answer even after SQuAD normalisation (a passage that holds "U.S." as "US" is neither:
    calling it answerless would teach the reader to miss it), labelled start = end = [CLS].
    A question with no positive feature is skipped whole (`skipped_no_positive`).
    """
    if not getattr(tokenizer, "is_fast", False):  # offset mappings and sequence_ids() need a fast tokenizer
        raise ValueError(f"reader features need a fast tokenizer, got {type(tokenizer).__name__}")
    if len(contexts) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(contexts)} contexts")
    if negatives_per_question < 0:
        raise ValueError(f"negatives_per_question must be >= 0, got {negatives_per_question}")
    stats = {"n_questions": len(examples), "n_features": 0, "n_positive": 0, "n_negative": 0,
             "skipped_no_positive": 0, "dropped_truncated": 0}
    features = []
    for example, passages in zip(examples, contexts):
        positives, negatives, dropped = _question_features(example, passages, tokenizer, max_length, negatives_per_question)
        stats["dropped_truncated"] += dropped
        if not positives:
            stats["skipped_no_positive"] += 1
            continue
        features += positives + negatives
        stats["n_positive"] += len(positives)
        stats["n_negative"] += len(negatives)
    stats["n_features"] = len(features)
    return features, stats


def _question_features(example: QAExample, passages: Sequence[Passage], tokenizer, max_length: int,
                       n_negatives: int) -> tuple[list[dict], list[dict], int]:
    """(positive features, negative features, positives dropped by truncation) of one question."""
    if not passages:
        return [], [], 0
    texts = [passage_text(p) for p in passages]
    enc = tokenizer([example.question] * len(texts), texts, truncation="only_second", max_length=max_length,
                    return_offsets_mapping=True)
    holds = AnswerInPassage()
    positives, negatives, dropped = [], [], 0
    for i, text in enumerate(texts):
        spans = find_answer_spans(example.answers, text)
        if spans:
            token_spans = (_token_span(enc["offset_mapping"][i], enc.sequence_ids(i), *s) for s in spans)
            span = next((t for t in token_spans if t is not None), None)
            if span is None:
                dropped += 1
            else:
                positives.append(_feature(enc, i, *span))
        elif len(negatives) < n_negatives and not holds(example.answers, passages[i]):
            ids = enc["input_ids"][i]  # "no answer" points at [CLS] (position 0 for BERT-style inputs)
            at = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            negatives.append(_feature(enc, i, at, at))
    return positives, negatives, dropped


def _feature(enc, i: int, start: int, end: int) -> dict:
    row = {key: list(enc[key][i]) for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc}
    return {**row, "start_positions": start, "end_positions": end}


def qa_collate(pad_id: int):
    """Right-pad input_ids with `pad_id` (attention_mask and token_type_ids with 0); stack the span labels."""
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in batch[0]:
                out[key] = torch.tensor([b[key] + [fill] * (width - len(b[key])) for b in batch], dtype=torch.long)
        for key in ("start_positions", "end_positions"):
            out[key] = torch.tensor([b[key] for b in batch], dtype=torch.long)
        return out
    return collate


# ---------------------------------------------------------------- training

def fit_reader(model_name_or_path: str, features: list[dict], dev_examples: Sequence[QAExample],
               dev_contexts: Sequence[Sequence[Passage]] | None, output_dir: str | Path, settings: TrainSettings,
               record: dict | None = None, *, max_length: int = MAX_LENGTH,
               negatives_per_question: int = NEGATIVES_PER_QUESTION, notes: dict | None = None) -> dict:
    """Fine-tune a QA-head model on span features; the best model (by dev EM) goes to `output_dir/final`.

    Checkpoints go to `output_dir`; a rerun with the same `record` resumes from the last one.
    With dev examples, each evaluation reads the dev contexts with an `ExtractiveReader` (dev EM
    picks the checkpoint, early stopping watches it) and reports the span loss on dev features
    built like the training ones (if no dev passage holds an answer, it warns and trains without
    dev). `notes` are written into final/rag_lab_training.json beside the training report, which
    is also returned, with "final_dir".
    """
    if settings.method != "full":  # LoRA targets in TrainSettings are decoder names; a span head on a small encoder trains fully
        raise TrainingError(f"the extractive reader trains with method 'full', got {settings.method!r}")
    if not features:
        raise TrainingError("empty training set: no reader features (no question's passages hold an answer span)")
    output_dir = Path(output_dir)
    record, resume = resume_point(output_dir, settings, record)
    model, tokenizer, _ = load_qa_model(model_name_or_path)  # an untrained head is the point of training
    dev_examples = list(dev_examples)
    callbacks, dev_features, dev_callback = [StopOnNonFiniteLoss()], [], None
    if dev_examples:
        dev_features, _ = build_reader_features(dev_examples, dev_contexts, tokenizer, max_length, negatives_per_question)
        if not dev_features:  # a small dev slice (smoke profiles) can miss every answer by chance: don't fail the run
            warnings.warn(f"none of the {len(dev_examples)} dev questions has an answer span in its passages, so dev EM "
                          "would stay 0 and could pick nothing: training without a dev set (the final model is the last "
                          "step's); raise training.dev_size or retriever.k", UserWarning, stacklevel=2)
            dev_examples = []
    if dev_examples:
        def make_reader(m):
            return ExtractiveReader(model_name_or_path, max_length=max_length, batch_size=settings.batch_size,
                                    model=m, tokenizer=tokenizer)

        dev_callback = DevEMCallback(make_reader, dev_examples, dev_contexts)
        callbacks += [dev_callback, EarlyStoppingCallback(early_stopping_patience=settings.patience)]
    trainer = Trainer(model=model, args=training_arguments(settings, output_dir, len(dev_examples), dev_callback is not None),
                      train_dataset=ListDataset(features), eval_dataset=ListDataset(dev_features) if dev_features else None,
                      data_collator=qa_collate(tokenizer.pad_token_id), callbacks=callbacks)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / CONFIG_FILE, record)
    def write(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    info = fit_and_save(trainer, resume, output_dir, settings, write, lambda result, cost: {
        "record": record, **(notes or {}), "n_train": len(features), "n_dev": len(dev_examples), **cost,
        "n_dev_features": len(dev_features), "train_loss": result.training_loss,
        "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint,
        "checkpoint_rule": CHECKPOINT_RULE if dev_callback else "the last step (no dev set)",
        "log_history": trainer.state.log_history, "dev_history": dev_callback.history if dev_callback else []})
    return {**info, "final_dir": str(output_dir / FINAL)}


def train_reader(examples: Split[QAExample], contexts: Split[list[Passage]], settings: TrainSettings, model: str,
                 output_dir: str | Path, record: dict) -> dict:
    """Train the span reader `model` on the training questions' retrieved passages (distant
    supervision, `build_reader_features`), dev EM on the dev questions' passages; the best model
    goes to `output_dir/final`. Returns its training info (also saved there)."""
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model)), trust_remote_code=False)
    features, stats = build_reader_features(examples.train, contexts.train, tokenizer)
    info = fit_reader(model, features, examples.dev, contexts.dev if examples.dev else None, output_dir, settings, record,
                      notes={"stats": stats, "n_train_questions": len(examples.train)})
    info.pop("final_dir")
    return info
