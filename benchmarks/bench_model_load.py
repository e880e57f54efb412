"""Load time of the embedded SmolLM2: de-quantising the GGUF vs reading the safetensors cache.

    python benchmarks/bench_model_load.py [--repeats 3]

Both paths load model + tokenizer in float32 on CPU. The cache is built first if missing
(that build is reported, not part of the comparison). The two models' logits are compared
as a check that the cache holds the same weights.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_lab import models

NAME = "smollm2-135m-instruct"


def load_from_gguf():
    """What resolve_model does on a cache miss, minus the saving: transformers' GGUF path."""
    entry = models.EMBEDDED_MODELS[NAME]
    gguf = models._package_dir(entry) / entry.path
    kwargs = dict(gguf_file=gguf.name, trust_remote_code=False)
    # The converter's own tqdm bar ignores transformers' progress-bar switch; hide it.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    return model, tokenizer


def load_from_cache():
    models._sha256.cache_clear()  # pay the staleness check (sha256 of the GGUF) as a new process would
    return models.load_causal_lm(NAME)


def timed(fn, repeats: int):
    """(seconds of each run, result of the last run)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="loads per path; the median is reported")
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()

    t0 = time.perf_counter()
    target = models.resolve_model(NAME)
    print(f"cache: {target} (resolve/build {time.perf_counter() - t0:.2f} s)")

    gguf_times, (gguf_model, tokenizer) = timed(load_from_gguf, args.repeats)
    cache_times, (cache_model, _) = timed(load_from_cache, args.repeats)

    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (gguf_model(ids).logits - cache_model(ids).logits).abs().max().item()

    gguf_s, cache_s = statistics.median(gguf_times), statistics.median(cache_times)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'path':<28}{'median s':>10}  runs")
    print(f"{'GGUF (de-quantise)':<28}{gguf_s:>10.2f}  {', '.join(f'{t:.2f}' for t in gguf_times)}")
    print(f"{'safetensors cache':<28}{cache_s:>10.2f}  {', '.join(f'{t:.2f}' for t in cache_times)}")
    print(f"speed-up: {gguf_s / cache_s:.1f}x   max |logit diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
