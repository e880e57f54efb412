"""vLLM inference backend for decoder-only readers on GPUs (`generator.backend: vllm`).

Why: on a GPU node the cost of RAG evaluation is prefill over long prompts for many questions;
vLLM's paged attention and continuous batching keep the GPU busy where `model.generate` pads
and waits. Tensor parallel by `generator.vllm_tensor_parallel`; data parallel by one engine per
GPU group through Ray Data (`rag_lab.scale.ray_generate`), as vLLM itself recommends for offline
data parallelism.

Everything but the decoding call is `HFGenerator`'s: the prompts (token ids from the same
tokenizer and chat template, handed to vLLM as `TokensPrompt`s, so both backends read the same
tokens), the batch plan and resume, the stop-at-first-line rule applied to the returned token
ids, and the prediction records. Decoding is greedy (temperature 0).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

from rag_lab.generators.ct2 import BackendError
from rag_lab.generators.hf import HFGenerator
from rag_lab.generators.prompts import Prompt, PromptBuilder

INSTALL = ("generator.backend: vllm needs the vllm package and a CUDA GPU; vllm pins its own torch, so install it in "
           "its own environment on the GPU machine: pip install vllm, then pip install -e . --no-deps (README, "
           "'Full scale'); or use generator.backend: transformers")


def require_vllm():
    """The vllm module, or a clear error saying how to install it."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendError(INSTALL)
    return importlib.import_module("vllm")


def load_vllm_engine(model_dir: Path, tensor_parallel: int = 1, dtype: str = "auto", seed: int = 0):
    """A `vllm.LLM` over a local checkpoint folder (never remote code)."""
    vllm = require_vllm()
    return vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=tensor_parallel, dtype=dtype,
                    seed=seed, trust_remote_code=False)


class VLLMGenerator(HFGenerator):
    """A decoder-only reader on a `vllm.LLM`. `generator.batch_size` is how many prompts go to the
    engine at once (and how often a resumable run logs): large on a GPU, e.g. 1024."""

    is_decoder_only = True

    def __init__(self, llm, tokenizer, prompt_builder: PromptBuilder, **kwargs):
        self.llm = llm
        vllm = require_vllm()
        self._sampling = vllm.SamplingParams(temperature=0.0, max_tokens=kwargs.get("max_new_tokens", 16),
                                             skip_special_tokens=True)
        self._tokens_prompt = importlib.import_module("vllm.inputs").TokensPrompt
        dtype = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "dtype", None)
        self.precision = str(dtype).replace("torch.", "") if dtype is not None else "auto"
        super().__init__(None, tokenizer, prompt_builder, **kwargs)  # no torch model here: vLLM holds the weights
        self.stats["new_tokens"] = 0

    def generate_batch(self, prompts: Sequence[Prompt]) -> list[str]:
        """Greedy continuations (raw text), cut where `StopAtNewline` would have stopped."""
        add_special = not self.builder.use_chat
        ids = [self.tokenizer(p.text, add_special_tokens=add_special)["input_ids"] for p in prompts]
        self.stats["prompt_tokens"] += sum(map(len, ids))
        self.stats["padded_tokens"] += sum(map(len, ids))  # no padding: paged attention
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=x) for x in ids], self._sampling, use_tqdm=False)
        new = [list(o.outputs[0].token_ids) for o in outputs]
        self.stats["new_tokens"] += sum(map(len, new))
        return [self.first_line(x) for x in new]
