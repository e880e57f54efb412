"""CTranslate2 inference backend for decoder-only readers (`generator.backend: ctranslate2`).

Why: on a CPU, int8 weights make decoding (memory-bound) several times faster than
transformers in float32; prefill (compute-bound) gains little, so prompt tokens stay the
cost. Training stays on transformers: a checkpoint is converted once, from the same
safetensors folder the transformers backend reads, into a cache keyed by its content.

The prompts, the batch plan, the stop-at-newline rule and the prediction records are those
of `HFGenerator`, so the two backends write the same records (and, in float32, the same
answers: tested on a tiny model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rag_lab.config import CT2_COMPUTE_TYPES as COMPUTE_TYPES
from rag_lab.generators.hf import HFGenerator
from rag_lab.generators.prompts import Prompt, PromptBuilder
# the conversion lives with the other weight caches (models.py): the int8 dense encoder uses it too
from rag_lab.models import CONVERTED_MARK, BackendError, convert, require_ctranslate2  # noqa: F401 (re-exported)

def resolve_compute_type(compute_type: str, device: str) -> str:
    """`auto`: int8 on a CPU (decoding is memory-bound), int8_float16 on CUDA."""
    if compute_type not in COMPUTE_TYPES:
        raise BackendError(f"generator.ct2_compute_type {compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}")
    if compute_type == "auto":
        return "int8_float16" if device == "cuda" else "int8"
    return compute_type


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class CT2DecoderGenerator(HFGenerator):
    """A decoder-only reader on a `ctranslate2.Generator`; everything but the decoding call is
    `HFGenerator`'s (prompts, length-sorted batches, resumable `generate`, records)."""

    is_decoder_only = True

    def __init__(self, generator, tokenizer, prompt_builder: PromptBuilder, compute_type: str = "", **kwargs):
        self.generator, self.compute_type = generator, compute_type  # the resolved one (timings: int8 or float)
        self.precision = "int8" if compute_type.startswith("int8") else "float32"
        super().__init__(None, tokenizer, prompt_builder, **kwargs)  # no torch model: CT2 holds the weights
        self.stats["new_tokens"] = 0

    def generate_batch(self, prompts: Sequence[Prompt]) -> list[str]:
        """Greedy continuations (raw text), cut where `StopAtNewline` would have stopped."""
        add_special = not self.builder.use_chat
        ids = [self.tokenizer(p.text, add_special_tokens=add_special)["input_ids"] for p in prompts]
        self.stats["prompt_tokens"] += sum(map(len, ids))
        self.stats["padded_tokens"] += max(map(len, ids)) * len(ids)
        results = self.generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(x) for x in ids], max_length=self.max_new_tokens,
            sampling_topk=1, beam_size=1, include_prompt_in_result=False)
        outs = [r.sequences_ids[0] for r in results]
        self.stats["new_tokens"] += sum(map(len, outs))
        return [self.first_line(o) for o in outs]


def load_ct2_generator(model_dir: Path, compute_type: str = "auto", device: str | None = None):
    """(ctranslate2.Generator, resolved compute type) for a local checkpoint, converting it once."""
    ctranslate2 = require_ctranslate2()
    device = device or default_device()
    compute = resolve_compute_type(compute_type, device)
    path = convert(Path(model_dir), compute)
    threads = {"intra_threads": torch.get_num_threads()} if device == "cpu" else {}
    return ctranslate2.Generator(str(path), device=device, compute_type=compute, **threads), compute
