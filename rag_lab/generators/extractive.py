"""Extractive reader (BERT-QA / DPR-reader style): copy the best answer span out of the passages.

For every (question, passage) pair the model gives each token a start logit and an end
logit; a span scores start_logits[s] + end_logits[e] (Devlin et al. 2019). Passages then
compete on their best span's score, as in the Hugging Face question-answering pipeline
(DPR's reader also has a passage-relevance head; an AutoModelForQuestionAnswering has none).

The reader reads `passage_text(p)` = "title. text", the same string the retrievers index,
and a Span's `start_char`/`end_char` index into that string, so a span may fall in the title.

Inference only: fine-tuning lives in `rag_lab.training`. A checkpoint with no QA head (the
embedded MiniLM encoder) gets a randomly initialised `qa_outputs` layer, so until it is
fine-tuned its answers are random spans of the passages; we warn, and `head_is_trained` says so.

Known limit: a passage longer than `max_length` tokens is truncated (no sliding window);
DPR-style 100-word passages fit easily in the default 384.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.models import resolve_model, unreported

# Seed for a randomly initialised QA head, so that even an untrained reader gives the same
# spans run after run (the caller's RNG is left untouched: see `load_qa_model`).
HEAD_INIT_SEED = 0


@dataclass(frozen=True)
class Span:
    text: str
    score: float  # start logit + end logit; -inf for the empty span
    passage_id: str  # "" for the empty span
    start_char: int  # into passage_text(passage) = "title. text"
    end_char: int  # exclusive


EMPTY_SPAN = Span(text="", score=float("-inf"), passage_id="", start_char=0, end_char=0)


def span_record(span: Span) -> list:
    """A span as the JSON value a resumable run logs (`generate(on_batch=...)`); -inf as None."""
    return [span.text, span.score if math.isfinite(span.score) else None, span.passage_id, span.start_char, span.end_char]


def span_from_record(record: Sequence) -> Span:
    text, score, passage_id, start, end = record
    return Span(text, float("-inf") if score is None else float(score), passage_id, int(start), int(end))


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
              max_answer_tokens: int) -> tuple[int, int, float]:
    """(start, end, score) of the best span, end inclusive, with s <= e < s + max_answer_tokens
    and both tokens inside the context; (-1, -1, -inf) when the mask allows no span.

    Ties go to the lowest start, then the lowest end: np.argmax returns the first maximum
    of the row-major (start, end) score matrix, which is exactly that order.
    """
    start, end = np.asarray(start_logits, dtype=np.float64), np.asarray(end_logits, dtype=np.float64)
    mask = np.asarray(context_mask, dtype=bool)
    if start.ndim != 1 or start.shape != end.shape or start.shape != mask.shape:
        raise ValueError(f"best_span wants three 1-D arrays of one length, got {start.shape}, {end.shape}, {mask.shape}")
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    if np.isnan(start).any() or np.isnan(end).any():  # argmax would pick a NaN: a model bug, not an answer
        raise ValueError("best_span got NaN logits")
    n = start.shape[0]
    length = np.arange(n)[None, :] - np.arange(n)[:, None]  # length[s, e] = e - s
    allowed = (length >= 0) & (length < max_answer_tokens) & mask[:, None] & mask[None, :]
    scores = np.where(allowed, start[:, None] + end[None, :], -np.inf)
    if n == 0:
        return -1, -1, float("-inf")
    s, e = divmod(int(np.argmax(scores)), n)
    if not allowed[s, e]:  # argmax lands outside the band only when no allowed span has a finite score
        return -1, -1, float("-inf")
    return s, e, float(scores[s, e])


def load_qa_model(name_or_path: str):
    """(model, fast tokenizer, head_is_trained) for an AutoModelForQuestionAnswering checkpoint.

    A missing `qa_outputs` head is initialised from HEAD_INIT_SEED inside fork_rng, so it is
    reproducible without reseeding the caller's global RNG.
    """
    path = str(resolve_model(name_or_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        # why unreported: a sentence encoder read as a span reader always "misses" the new qa_outputs head and
        # leaves its pooler unused; `head_is_trained` below says what matters, in one warning of ours
        with unreported("transformers.modeling_utils", "LOAD REPORT"):
            model, info = AutoModelForQuestionAnswering.from_pretrained(
                path, trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    head_is_trained = not any("qa_outputs" in key for key in info.get("missing_keys", ()))
    return model, tokenizer, head_is_trained


class ExtractiveReader:
    """generate(examples, contexts) -> one span per example, copied from its passages."""

    def __init__(self, model_name_or_path: str, max_length: int = 384, max_answer_tokens: int = 10,
                 batch_size: int = 32, model=None, tokenizer=None):
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (then both load from model_name_or_path)")
        if max_answer_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_answer_tokens and batch_size must be >= 1, got {max_answer_tokens}, {batch_size}")
        self.head_is_trained = True  # a model passed in is assumed to be what the caller wants
        if model is None:
            model, tokenizer, self.head_is_trained = load_qa_model(model_name_or_path)
        if not self.head_is_trained:
            warnings.warn(f"{model_name_or_path!r} has no trained QA head: qa_outputs is randomly initialised, so the "
                          "reader's spans are random until it is fine-tuned (rag_lab.training); its scores mean nothing yet",
                          UserWarning, stacklevel=2)
        if not getattr(tokenizer, "is_fast", False):  # offset mappings and sequence_ids() need a fast tokenizer
            raise ValueError(f"the extractive reader needs a fast tokenizer, got {type(tokenizer).__name__}")
        _check_max_length(model, max_length)
        self.name, self.model, self.tokenizer = model_name_or_path, model.eval(), tokenizer
        self.max_length, self.max_answer_tokens, self.batch_size = max_length, max_answer_tokens, batch_size
        self.device = getattr(model, "device", torch.device("cpu"))

    def read(self, question: str, passages: Sequence[Passage]) -> Span:
        """The best span for one question over its passages (EMPTY_SPAN if there are none)."""
        return self._read_groups([question], [passages], show_progress=False)[0]

    precision = "float32"

    def generate(self, examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None = None,
                 show_progress: bool = False, done: Mapping[int, Sequence] | None = None,
                 on_batch: Callable[[list[int], list[list]], None] | None = None,
                 doc_logits: Sequence[Sequence[float]] | None = None) -> list[dict]:
        """One prediction dict per example, in input order: id, raw, prediction, passage_id, score.

        An example with no passages predicts "" with passage_id and score None (None, not
        -inf, so that the predictions stay valid JSON). Resumable like every generator: `done`
        maps example indices to the `span_record`s that `on_batch(indices, records)` reported
        for them; the batch plan over (question, passage) pairs is the same on every run, and a
        batch is skipped only when all its pairs belong to answered examples.
        """
        if contexts is None:
            raise ValueError("ExtractiveReader.generate needs contexts (one list of passages per example): "
                             "an extractive reader can only copy its answer out of passages, it has no closed-book mode")
        if len(contexts) != len(examples):
            raise ValueError(f"{len(examples)} examples but {len(contexts)} contexts")
        spans = self._read_groups([e.question for e in examples], contexts, show_progress, done, on_batch)
        return [_prediction(e, s) for e, s in zip(examples, spans)]

    def token_counts(self, preds: Sequence[dict]) -> dict[str, int]:
        """Empty: the reader writes no tokens, and timings.csv's 2 N per token read/written FLOP
        count is a decoder's; its cost is recorded as time alone."""
        return {}

    def _read_groups(self, questions: Sequence[str], contexts: Sequence[Sequence[Passage]], show_progress: bool,
                     done: Mapping[int, Sequence] | None = None, on_batch=None) -> list[Span]:
        """Best span per question; all (question, passage) pairs are batched together. A question
        is decided (and reported to `on_batch`) once all its pairs are read, comparing its spans in
        passage-rank order: ">" keeps the higher-ranked passage on a tie."""
        done = done or {}
        pairs = [(q, p) for q, passages in enumerate(contexts) for p in passages]
        best = [span_from_record(done[q]) if q in done else EMPTY_SPAN for q in range(len(questions))]
        of_question: dict[int, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            of_question.setdefault(q, []).append(i)
        left = {q: len(ix) for q, ix in of_question.items() if q not in done}
        spans: list[Span | None] = [None] * len(pairs)

        def read(batch: list[int], batch_spans: list[Span]) -> None:
            completed = []
            for i, span in zip(batch, batch_spans):
                spans[i] = span
                q = pairs[i][0]
                if q in left:
                    left[q] -= 1
                    if not left[q]:
                        del left[q]
                        completed.append(q)
            for q in completed:
                for i in of_question[q]:
                    if spans[i].score > best[q].score:
                        best[q] = spans[i]
            if on_batch and completed:
                on_batch(completed, [span_record(best[q]) for q in completed])

        self._read_pairs([questions[q] for q, _ in pairs], [p for _, p in pairs], show_progress,
                         skip=lambda i: pairs[i][0] in done, on_read=read)
        return best

    def _read_pairs(self, questions: list[str], passages: list[Passage], show_progress: bool,
                    skip: Callable[[int], bool] = lambda i: False, on_read=None) -> list[Span]:
        """Best span of each (question, passage) pair, in input order (EMPTY_SPAN for skipped ones);
        `on_read(pair indices, spans)` after each batch. Batches with only skipped pairs are not read."""
        texts = [passage_text(p) for p in passages]
        # Longest first so that each batch pads to a similar length: fewer wasted pad tokens.
        order = sorted(range(len(texts)), key=lambda i: (-len(questions[i]) - len(texts[i]), i))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        spans: list[Span] = [EMPTY_SPAN] * len(texts)
        for batch in tqdm(batches, desc="read", disable=not show_progress):
            if all(skip(i) for i in batch):
                continue
            read = self._read_batch([questions[i] for i in batch], [passages[i] for i in batch], [texts[i] for i in batch])
            for i, span in zip(batch, read):
                spans[i] = span
            if on_read:
                on_read(batch, read)
        return spans

    @torch.inference_mode()
    def _read_batch(self, questions: list[str], passages: list[Passage], texts: list[str]) -> list[Span]:
        """One forward pass over a batch of pairs; the best span of each, as text of `texts`."""
        enc = self.tokenizer(questions, texts, truncation="only_second", max_length=self.max_length, padding=True,
                             return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").numpy()  # not a model input
        # sequence_ids() is 1 on passage tokens only: the question and special tokens can never be the answer.
        masks = np.array([[sid == 1 for sid in enc.sequence_ids(i)] for i in range(len(texts))], dtype=bool)
        out = self.model(**{k: v.to(self.device) for k, v in enc.items()})
        starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        return [self._span(p, text, *best_span(st, en, m, self.max_answer_tokens), off)
                for p, text, st, en, m, off in zip(passages, texts, starts, ends, masks, offsets)]

    @staticmethod
    def _span(passage: Passage, text: str, start: int, end: int, score: float, offsets: np.ndarray) -> Span:
        """Token span -> character span of `text`; EMPTY_SPAN if the passage had no tokens to choose from."""
        if start < 0:
            return EMPTY_SPAN
        # Offsets of second-sequence tokens are relative to the second sequence, i.e. to `text`.
        start_char, end_char = int(offsets[start][0]), int(offsets[end][1])
        return Span(text[start_char:end_char], score, passage.id, start_char, end_char)


def _check_max_length(model, max_length: int) -> None:
    """A max_length past the position embeddings would crash mid-run (or silently wrap): fail now."""
    if max_length < 8:  # room for the special tokens, a question and some passage
        raise ValueError(f"max_length must be >= 8, got {max_length}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}")


def _prediction(example: QAExample, span: Span) -> dict:
    found = math.isfinite(span.score)
    return {"id": example.id, "raw": span.text, "prediction": span.text,
            "passage_id": span.passage_id if found else None, "score": span.score if found else None}
