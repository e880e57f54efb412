"""Fine-tuning a dense retriever on BM25-mined pairs (DPR-style distant supervision).

NQ-open has questions and answer strings but no gold passages, so DPR (Karpukhin et
al. 2020, sec. 5.1) takes as positive the highest-ranked BM25 passage that contains an
answer, and as hard negative the highest-ranked BM25 passage that does not. We do the
same, then train with in-batch negatives plus the hard negative (MultipleNegativesRankingLoss):

    report = train_dense_retriever(train_questions, bm25_contexts, cfg.train_retriever, "models/minilm-nq")
    # any experiment can then use   retriever.encoder: models/minilm-nq

    pairs, stats = mine_training_pairs(train_questions, bm25_contexts)     # the primitives below it
    report = fit_dense_retriever("all-minilm-l6-v2", pairs, "models/minilm-nq")

`bm25_contexts` are each question's BM25 top-`mining_depth` passages (`pipeline.contexts`).

The saved folder is a plain sentence-transformers checkpoint plus `rag_lab_training.json`
(the arguments, the prefixes to retrieve with, and the loss history).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentence_transformers
import torch
import transformers
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from rag_lab.config import RetrieverTrainingConfig
from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.io import check_replaceable
from rag_lab.metrics import AnswerInPassage
from rag_lab.models import load_sentence_encoder
from rag_lab.training.common import save_trained


@dataclass(frozen=True)
class TrainPair:
    """One training example: a question, a passage with its answer, passages without it."""

    question: str
    positive: str
    negatives: tuple[str, ...]
    question_id: str = ""
    positive_id: str = ""
    negative_ids: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- mining


def mine_training_pairs(questions: Sequence[QAExample], contexts: Sequence[Sequence[Passage]],
                        n_hard_negatives: int = 1) -> tuple[list[TrainPair], dict]:
    """One TrainPair per question that has an answer-bearing passage among its ranked `contexts`
    (DPR: the BM25 top-`depth`).

    Positive: the highest-ranked passage with a gold answer (`AnswerInPassage`); hard negatives:
    the `n_hard_negatives` highest-ranked without one. Questions with no positive, or with
    too few negatives, are skipped and counted. Deterministic (the ranking is).
    """
    if n_hard_negatives < 0:
        raise ValueError(f"need n_hard_negatives >= 0, got {n_hard_negatives}")
    if len(contexts) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    holds = AnswerInPassage()  # a passage recurs across questions: normalised once
    pairs, no_positive, no_negative = [], 0, 0
    for q, ranked in zip(questions, contexts):
        positive, negatives = _split_ranking(q.answers, ranked, n_hard_negatives, holds)
        if positive is None:
            no_positive += 1
        elif len(negatives) < n_hard_negatives:
            no_negative += 1
        else:
            pairs.append(TrainPair(q.question, passage_text(positive), tuple(passage_text(p) for p in negatives),
                                   q.id, positive.id, tuple(p.id for p in negatives)))
    stats = {"n_questions": len(questions), "n_pairs": len(pairs), "skipped_no_positive": no_positive,
             "skipped_no_negative": no_negative, "depth": max((len(c) for c in contexts), default=0),
             "n_hard_negatives": n_hard_negatives}
    return pairs, stats


def _split_ranking(answers: Sequence[str], ranked: Sequence[Passage], n_negatives: int,
                   holds: AnswerInPassage) -> tuple[Passage | None, list[Passage]]:
    """(first passage with an answer, first `n_negatives` without), scanning only as far as needed."""
    positive, negatives = None, []
    for p in ranked:
        if positive is not None and len(negatives) == n_negatives:
            break
        if holds(answers, p):
            if positive is None:
                positive = p
        elif len(negatives) < n_negatives:
            negatives.append(p)
    return positive, negatives


# ----------------------------------------------------------------------------- training


def _st_training_api():
    """(MultipleNegativesRankingLoss, BatchSamplers); sentence-transformers 6 moved both."""
    try:  # why: sentence-transformers 6 moved both; the import that works says which layout is installed
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # why: the 3.x - 5.x layout
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers
    return MultipleNegativesRankingLoss, BatchSamplers


def _columns(pairs: Sequence[TrainPair], query_prefix: str = "", passage_prefix: str = "") -> dict[str, list[str]]:
    """Text columns in the order MNRL reads them: anchor, positive, negative(s).

    Prefixes are prepended here, exactly as DenseRetriever prepends them at retrieval time.
    """
    n_neg = {len(p.negatives) for p in pairs}
    if len(n_neg) != 1:
        raise ValueError(f"every pair needs the same number of negatives, got counts {sorted(n_neg)}")
    n_neg = n_neg.pop()
    columns = {"anchor": [query_prefix + p.question for p in pairs],
               "positive": [passage_prefix + p.positive for p in pairs]}
    names = ["negative"] if n_neg == 1 else [f"negative_{i + 1}" for i in range(n_neg)]
    for i, name in enumerate(names):
        columns[name] = [passage_prefix + p.negatives[i] for p in pairs]
    return columns


def contrastive_loss(model, pairs: Sequence[TrainPair], batch_size: int = 32,
                     query_prefix: str = "", passage_prefix: str = "") -> float:
    """Mean MultipleNegativesRankingLoss over `pairs`, in order, in batches of `batch_size`.

    No gradient, eval mode (no dropout), fixed batches: so the numbers before and after
    training are comparable. A batch's in-batch negatives are the other pairs' passages.
    """
    if not pairs:
        raise ValueError("contrastive_loss needs at least one pair")
    mnrl, _ = _st_training_api()
    loss_fn = mnrl(model)
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        embeddings = [model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)
                      for texts in _columns(batch, query_prefix, passage_prefix).values()]
        with torch.no_grad():
            total += loss_fn.compute_loss_from_embeddings(embeddings, None).item() * len(batch)
    return total / len(pairs)


def train_dense_retriever(examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]],
                          settings: RetrieverTrainingConfig, output_dir: str | Path, notes: dict | None = None) -> dict:
    """Fine-tune `settings.base_encoder` on the pairs mined from each training question's ranked
    passages (`mine_training_pairs`); saved to `output_dir` with the report (and the mining
    statistics under "mining"), which is returned."""
    pairs, stats = mine_training_pairs(examples, contexts, n_hard_negatives=settings.n_hard_negatives)
    return fit_dense_retriever(settings.base_encoder, pairs, output_dir, epochs=settings.epochs,
                               batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                               seed=settings.seed, notes={**(notes or {}), "mining": stats})


def fit_dense_retriever(encoder, pairs: Sequence[TrainPair], output_dir: str | Path, epochs: int = 1,
                        batch_size: int = 32, learning_rate: float = 2e-5, warmup_ratio: float = 0.1,
                        seed: int = 0, max_length: int = 256, query_prefix: str = "",
                        passage_prefix: str = "", logging_steps: int | None = None, notes: dict | None = None) -> dict:
    """Fine-tune a sentence-transformers encoder on mined pairs; save it to `output_dir`.

    `encoder` is a name/path for `load_sentence_encoder` or a SentenceTransformer (trained
    in place). Float32 throughout. The folder appears only when complete (written beside
    it, then renamed). Returns the report also saved there as `rag_lab_training.json`, with
    `notes` (e.g. the config and mining statistics of the study that asked for it) merged in.
    """
    if not pairs:
        raise ValueError("fit_dense_retriever needs at least one pair")
    check_replaceable(Path(output_dir))  # before hours of training, not at the rename
    if not 0 <= warmup_ratio < 1:  # transformers reads warmup_steps >= 1 as a step count
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    model = load_sentence_encoder(encoder) if isinstance(encoder, (str, Path)) else encoder
    model.max_seq_length = max_length
    mnrl, batch_samplers = _st_training_api()
    dataset = Dataset.from_dict(_columns(pairs, query_prefix, passage_prefix))
    steps = math.ceil(len(pairs) / batch_size) * epochs
    loss_before = contrastive_loss(model, pairs, batch_size, query_prefix, passage_prefix)

    with tempfile.TemporaryDirectory(prefix="rag_lab_trainer_") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,  # checkpoints are not kept: only the final model is saved
            num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            warmup_steps=warmup_ratio, seed=seed, data_seed=seed,
            batch_sampler=batch_samplers.NO_DUPLICATES,  # a duplicate passage would be a false in-batch negative
            fp16=False, bf16=False, save_strategy="no", report_to="none", push_to_hub=False,
            logging_steps=logging_steps or max(1, steps // 10), dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available())
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=mnrl(model))
        start = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - start

    loss_after = contrastive_loss(model, pairs, batch_size, query_prefix, passage_prefix)
    report = {
        "encoder": str(encoder) if isinstance(encoder, (str, Path)) else type(encoder).__name__,
        "n_pairs": len(pairs), "n_hard_negatives": len(pairs[0].negatives), "epochs": epochs,
        "batch_size": batch_size, "learning_rate": learning_rate, "warmup_ratio": warmup_ratio, "seed": seed,
        "max_length": max_length, "query_prefix": query_prefix, "passage_prefix": passage_prefix,
        "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 2),
        "train_loss": result.training_loss, "loss_before": loss_before, "loss_after": loss_after,
        "loss_history": [{k: e[k] for k in ("step", "epoch", "loss", "learning_rate") if k in e}
                         for e in trainer.state.log_history if "loss" in e],
        "versions": _versions(), **(notes or {}),
    }
    save_trained(output_dir, lambda tmp: model.save(str(tmp)), report)
    return report


def _versions() -> dict[str, str]:
    return {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}
