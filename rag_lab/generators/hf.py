"""Decoder-only and encoder-decoder generators with batched greedy decoding.

Prompts are sorted by length and batched so padding stays small (left padding for
decoder-only models, whose continuation must start right after the prompt). Decoding is
greedy (reported numbers are never sampled) and stops at the end of the first line.
"""
from __future__ import annotations

import hashlib

from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.postprocess import clean_answer
from rag_lab.generators.prompts import Prompt, PromptBuilder


class StopAtNewline(StoppingCriteria):
    """Finish a sequence once its continuation contains a newline: the answer is the first line.
    (Decodes the new tokens, so it works with any tokenizer, unlike token-id matching.)"""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip("\n") for t in texts], dtype=torch.bool, device=input_ids.device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties by index: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def resumable_batches(sizes: Sequence[int], batch_size: int, run_batch: Callable[[list[int]], list[str]],
                      done: Mapping[int, str] | None = None, on_batch: Callable[[list[int], list[str]], None] | None = None,
                      show_progress: bool = False) -> list[str]:
    """The one generation loop every generator runs: raw outputs for items 0..n-1, in input order.

    Items go in `length_sorted_batches(sizes, batch_size)`, a deterministic plan, so a caller can resume:
    `done` maps the items already generated to their raw outputs (batches fully in it are skipped), and
    `on_batch(indices, raws)` is called after each new batch (the runner logs it to disk)."""
    raws: dict[int, str] = dict(done or {})
    for batch in tqdm(length_sorted_batches(sizes, batch_size), desc="generate", disable=not show_progress):
        if all(i in raws for i in batch):
            continue
        outs = run_batch(batch)
        raws.update(zip(batch, outs))
        if on_batch:
            on_batch(batch, outs)
    return [raws[i] for i in range(len(sizes))]


class HFGenerator:
    """Shared by both families: prompt building, batching, greedy decoding, post-processing."""

    is_decoder_only: bool = True
    precision: str = "float32"  # what the weights compute in (timings.csv picks the matching peak)

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, max_new_tokens: int = 16,
                 batch_size: int = 16, strip_prefixes: Sequence[str] = ("the answer is", "answer:"), stop_at_newline: bool = True):
        self.model, self.tokenizer, self.builder = None if model is None else model.eval(), tokenizer, prompt_builder
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.strip_prefixes, self.stop_at_newline = tuple(strip_prefixes), stop_at_newline
        self.stats = {"prompt_tokens": 0, "padded_tokens": 0}

    def prompts(self, examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None = None) -> list[Prompt]:
        if contexts is None:
            return [self.builder.closed_book(e) for e in examples]
        if len(contexts) != len(examples):
            raise ValueError(f"{len(examples)} examples but {len(contexts)} contexts")
        return [self.builder.rag(e, ctx) for e, ctx in zip(examples, contexts)]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Prompt]) -> list[str]:
        """Greedy continuations (raw text) of one batch of prompts."""
        enc = self.tokenizer([p.text for p in prompts], return_tensors="pt", padding=True,
                             add_special_tokens=not self.builder.use_chat)
        self.stats["prompt_tokens"] += int(enc["attention_mask"].sum())
        self.stats["padded_tokens"] += int(enc["attention_mask"].numel())
        prompt_length = enc["input_ids"].shape[1]
        stop = [StopAtNewline(self.tokenizer, prompt_length)] if self.stop_at_newline and self.is_decoder_only else []
        extra = {"stopping_criteria": StoppingCriteriaList(stop)} if stop else {}
        out = self.model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, **extra)
        new_tokens = out[:, prompt_length:] if self.is_decoder_only else out
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def first_line(self, new_ids: Sequence[int]) -> str:
        """The text up to the token that completes the first line: what `generate_batch` returns, since
        its stopping criterion checks the decoded continuation after every token (engines that decode
        on their own, CTranslate2 and vLLM, cut their output with it)."""
        if self.stop_at_newline:
            for t in range(1, len(new_ids)):
                text = self.tokenizer.decode(new_ids[:t], skip_special_tokens=True)
                if "\n" in text.lstrip("\n"):
                    return text
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def predictions(self, examples: Sequence[QAExample], prompts: Sequence[Prompt], raws: Sequence[str]) -> list[dict]:
        return [{"id": e.id, "raw": raw, "prediction": clean_answer(raw, self.strip_prefixes),
                 "prompt_tokens": p.n_tokens, "truncated": p.truncated, "n_passages": p.n_passages,
                 "prompt_sha256": hashlib.sha256(p.text.encode("utf-8")).hexdigest()}
                for e, p, raw in zip(examples, prompts, raws)]

    def generate(self, examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None = None,
                 show_progress: bool = False, done: Mapping[int, str] | None = None,
                 on_batch: Callable[[list[int], list[str]], None] | None = None,
                 doc_logits: Sequence[Sequence[float]] | None = None) -> list[dict]:
        """Predictions for every example (closed-book when `contexts` is None), in input order.
        (`doc_logits`, the retriever's weights, are read by the readers of `fusion.py`; a prompt of
        concatenated passages has no use for them.)

        The batch plan is deterministic (length-sorted), so a caller can resume: `done` maps the
        example indices already generated to their raw outputs (batches fully in it are skipped),
        and `on_batch(indices, raws)` is called after each new batch (the runner logs it to disk)."""
        prompts = self.prompts(examples, contexts)
        raws = resumable_batches([p.n_tokens for p in prompts], self.batch_size,
                                 lambda batch: self.generate_batch([prompts[i] for i in batch]), done, on_batch, show_progress)
        return self.predictions(examples, prompts, raws)

    def token_counts(self, preds: Sequence[dict]) -> dict[str, int]:
        """Tokens read and written (timings.csv). New tokens are counted by re-tokenising the raw
        answers, so a resumed run counts every batch, including those of earlier sessions."""
        return {"prompt_tokens": sum(p.get("prompt_tokens", 0) for p in preds),
                "new_tokens": sum(len(self.tokenizer(p["raw"], add_special_tokens=False)["input_ids"]) for p in preds)}

    @property
    def padding_fraction(self) -> float:
        padded = self.stats["padded_tokens"]
        return 1.0 - self.stats["prompt_tokens"] / padded if padded else 0.0


class DecoderGenerator(HFGenerator):
    """Decoder-only LM (SmolLM2, Qwen, Llama...): chat template when the tokenizer has one."""

    is_decoder_only = True

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, **kwargs):
        if tokenizer.padding_side != "left":
            raise ValueError("decoder-only batched generation needs tokenizer.padding_side == 'left'")
        super().__init__(model, tokenizer, prompt_builder, **kwargs)


class Seq2SeqGenerator(HFGenerator):
    """Encoder-decoder LM (T5 / FLAN-T5 / BART): plain prompts, the decoder writes only the answer."""

    is_decoder_only = False

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, **kwargs):
        prompt_builder.use_chat = False
        super().__init__(model, tokenizer, prompt_builder, **kwargs)
