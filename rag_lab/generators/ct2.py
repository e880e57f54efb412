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

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from filelock import FileLock

from rag_lab.config import CT2_COMPUTE_TYPES as COMPUTE_TYPES
from rag_lab.generators.hf import HFGenerator
from rag_lab.generators.prompts import Prompt, PromptBuilder
from rag_lab.io import UserError, stable_hash
from rag_lab.models import model_fingerprint
from rag_lab.paths import cache_dir

CONVERTED_MARK = "rag_lab_ct2.json"  # written last: a folder without it is not a finished conversion


class BackendError(UserError, ValueError):
    """A backend that cannot serve this model or this machine; the message says how to fix it."""


def require_ctranslate2():
    """The ctranslate2 module, or a clear error saying how to install it."""
    if importlib.util.find_spec("ctranslate2") is None:
        raise BackendError("generator.backend: ctranslate2 needs the ctranslate2 package, which is not installed; "
                           "install it with: pip install 'ctranslate2>=4.5' (or use generator.backend: transformers)")
    import ctranslate2  # why: optional backend; a clear BackendError when it is missing

    return ctranslate2


def resolve_compute_type(compute_type: str, device: str) -> str:
    """`auto`: int8 on a CPU (decoding is memory-bound), int8_float16 on CUDA."""
    if compute_type not in COMPUTE_TYPES:
        raise BackendError(f"generator.ct2_compute_type {compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}")
    if compute_type == "auto":
        return "int8_float16" if device == "cuda" else "int8"
    return compute_type


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def convert(model_dir: Path, quantization: str) -> Path:
    """The CTranslate2 conversion of a local transformers checkpoint, cached by content.

    The key is the checkpoint's fingerprint, the quantization and the ctranslate2 version;
    builders serialise on a file lock and a folder appears only by renaming a complete one."""
    ctranslate2 = require_ctranslate2()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BackendError(f"generator.backend: ctranslate2 converts a local checkpoint folder with a config.json; "
                           f"{model_dir} has none (hub ids: download the model first, or use backend: transformers)")
    key = stable_hash({"model": model_fingerprint(model_dir), "quantization": quantization, "ct2": ctranslate2.__version__})
    root = cache_dir("models") / "ct2"
    target = root / f"{model_dir.name}-{quantization}-{key[:16]}"
    if (target / CONVERTED_MARK).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):
        if (target / CONVERTED_MARK).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            _convert_into(model_dir, tmp / "model", quantization)
            (tmp / "model" / CONVERTED_MARK).write_text(json.dumps({"source": str(model_dir), "key": key}) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # an unfinished folder from a killed run
            (tmp / "model").replace(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(model_dir: Path, out: Path, quantization: str) -> None:
    from ctranslate2.converters import TransformersConverter  # why: optional backend (require_ctranslate2 checked it)

    try:
        TransformersConverter(str(model_dir), low_cpu_mem_usage=True).convert(str(out), quantization=quantization)
    except (ValueError, NotImplementedError, KeyError) as e:  # e.g. an architecture without a CT2 loader
        raise BackendError(f"ctranslate2 cannot convert {model_dir}: {e}; use generator.backend: transformers") from e
    # CT2 refuses a null special token when it loads the model; tokenizers without a BOS token
    # (Qwen's, for one) leave it null. It is only used when no prompt is given, and we always give one.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("bos_token", "unk_token"):
        if config.get(key) is None:
            config[key] = config["eos_token"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


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
