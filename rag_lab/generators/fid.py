"""Fusion-in-Decoder (Izacard & Grave 2021): each (question, passage) pair encoded alone, the encoder
states concatenated, decoded once. `FiDModel` is the training view of a plain seq2seq model
(`training.fid`); `FiDGenerator` reads the same way, with the interface of every generator.

    gen = FiDGenerator(model, tokenizer, builder, max_new_tokens=16)
    preds = gen.generate(questions, passages)
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.hf import HFGenerator, resumable_batches
from rag_lab.generators.prompts import PromptBuilder


def fid_encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[BaseModelOutput, torch.Tensor]:
    """Fusion-in-Decoder's encoder: [b, k, L] (question, passage) pairs encoded one by one, their states
    concatenated to [b, k * L, H] with the matching mask [b, k * L]. Padding rows (mask all 0) are
    masked out in the decoder's cross-attention."""
    b, k, length = input_ids.shape
    states = model.get_encoder()(input_ids=input_ids.view(b * k, length), attention_mask=attention_mask.view(b * k, length))
    hidden = states.last_hidden_state.view(b, k * length, -1)
    return BaseModelOutput(last_hidden_state=hidden), attention_mask.view(b, k * length)


def fid_batch(tokenizer, texts: Sequence[Sequence[str]], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """[b, k, L] ids and mask for b questions with up to k (question, passage) texts each (short rows padded)."""
    k = max(map(len, texts))
    flat = [t for row in texts for t in list(row) + [""] * (k - len(row))]
    enc = tokenizer(flat, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    empty = torch.tensor([j >= len(row) for row in texts for j in range(k)])
    enc["attention_mask"][empty] = 0
    return {"input_ids": enc["input_ids"].view(len(texts), k, -1), "attention_mask": enc["attention_mask"].view(len(texts), k, -1)}


class FiDModel(torch.nn.Module):
    """An encoder-decoder LM read the Fusion-in-Decoder way; the weights are the plain model's (`.model`),
    so a FiD-trained checkpoint saves and loads as an ordinary seq2seq model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        encoded, mask = fid_encode(self.model, input_ids, attention_mask)
        return self.model(encoder_outputs=encoded, attention_mask=mask, labels=labels)


class FiDGenerator(HFGenerator):
    """Fusion-in-Decoder reader: batched greedy decoding over the fused encoder states; the same
    prediction records as the other generators. Each passage gets its own prompt (question + that
    passage, at most `max_input_tokens`), so the encoder's cost grows linearly in k."""

    is_decoder_only = False

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, **kwargs):
        if prompt_builder.use_chat:  # the chat decision is prompt_builder's (generator.kind: seq2seq reads plain text)
            raise ValueError("an encoder-decoder reader reads plain-text prompts: build them with prompt_builder(cfg) for "
                             "generator.kind: seq2seq")
        super().__init__(model, tokenizer, prompt_builder, **kwargs)

    def generate(self, examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None = None,
                 show_progress: bool = False, done: Mapping[int, str] | None = None,
                 on_batch: Callable[[list[int], list[str]], None] | None = None,
                 doc_logits: Sequence[Sequence[float]] | None = None) -> list[dict]:
        if contexts is None:
            raise ValueError("FiDGenerator reads passages: it needs contexts")
        if len(contexts) != len(examples):
            raise ValueError(f"{len(examples)} examples but {len(contexts)} contexts")
        prompts = [[self.builder.rag(e, [p]) for p in ctx] or [self.builder.closed_book(e)] for e, ctx in zip(examples, contexts)]
        sizes = [sum(p.n_tokens for p in row) for row in prompts]
        raws = resumable_batches(sizes, self.batch_size, lambda batch: self.generate_fused([[p.text for p in prompts[i]] for i in batch]),
                                 done, on_batch, show_progress)
        preds = self.predictions(examples, [row[0] for row in prompts], raws)
        for pred, row, ctx in zip(preds, prompts, contexts):
            pred["prompt_tokens"], pred["n_passages"] = sum(p.n_tokens for p in row), len(ctx)
            pred["truncated"] = any(p.truncated for p in row)
        return preds

    @torch.inference_mode()
    def generate_fused(self, texts: list[list[str]]) -> list[str]:
        """Greedy answers for a batch of questions, each given as its list of (question, passage) texts."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in fid_batch(self.tokenizer, texts).items()}
        self.stats["prompt_tokens"] += int(batch["attention_mask"].sum())
        self.stats["padded_tokens"] += int(batch["attention_mask"].numel())
        encoded, mask = fid_encode(self.model, batch["input_ids"], batch["attention_mask"])
        out = self.model.generate(encoder_outputs=encoded, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
