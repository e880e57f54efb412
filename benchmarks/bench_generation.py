"""Batched, length-sorted greedy generation vs a one-question-at-a-time `model.generate` loop.

    python benchmarks/bench_generation.py [--n 200] [--k 0]

Same 200 NQ-mini eval questions, same prompts, same greedy settings; reports the speed ratio,
whether outputs are identical, the padding fraction of prefill tokens, and prefill FLOP/s as a
fraction of the float32 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, causal_lm_flops_per_token, matmul_peak_flops  # noqa: E402

from rag_lab.config import GeneratorConfig, RetrieverConfig  # noqa: E402
from rag_lab.data import load_corpus, load_qa  # noqa: E402
from rag_lab.data.subsets import subset_questions  # noqa: E402
from rag_lab.generators import build_generator  # noqa: E402
from rag_lab.io import write_json  # noqa: E402


def one_by_one(gen, prompts) -> list[str]:
    """What most tutorials do: tokenize one prompt, generate, decode — no batching, no padding."""
    out = []
    for p in prompts:
        enc = gen.tokenizer(p.text, return_tensors="pt", add_special_tokens=not gen.builder.use_chat)
        with torch.inference_mode():
            ids = gen.model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=gen.max_new_tokens,
                                     pad_token_id=gen.tokenizer.pad_token_id)
        out.append(gen.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=0, help="passages per prompt (0: closed-book)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation.json")
    args = ap.parse_args()

    peaks = [matmul_peak_flops()]  # sampled around every timed part; the best is the reference
    questions = subset_questions(load_qa("nq-mini", "eval"), args.n, seed=0)
    gen = build_generator(GeneratorConfig(batch_size=args.batch_size, max_new_tokens=16))
    gen.stop_at_newline = False  # the loop below has no stop criterion: compare like with like
    contexts = None
    if args.k:
        from rag_lab.pipeline import contexts as retrieve

        passages = load_corpus("nq-mini")
        contexts = retrieve(RetrieverConfig(kind="bm25"), passages, args.k, questions, show_progress=False)[0].passages
    prompts = gen.prompts(questions, contexts)

    t = time.perf_counter()
    batched = [p["raw"] for p in gen.generate(questions, contexts)]
    t_batched = time.perf_counter() - t
    peaks.append(matmul_peak_flops())
    t = time.perf_counter()
    single = one_by_one(gen, prompts)
    t_single = time.perf_counter() - t
    peaks.append(matmul_peak_flops())
    same = sum(a == b for a, b in zip(batched, single))

    # prefill alone: one forward pass over each length-sorted batch
    from rag_lab.generators import length_sorted_batches

    batches = length_sorted_batches([p.n_tokens for p in prompts], args.batch_size)
    encs = [gen.tokenizer([prompts[i].text for i in b], return_tensors="pt", padding=True, add_special_tokens=not gen.builder.use_chat) for b in batches]
    with torch.inference_mode():
        t_prefill = best_of(lambda: [gen.model(**e) for e in encs], repeats=2)
    peaks.append(matmul_peak_flops())
    peak = max(peaks)
    real = sum(int(e["attention_mask"].sum()) for e in encs)
    padded = sum(e["attention_mask"].numel() for e in encs)
    prefill_flops = causal_lm_flops_per_token(gen.model) * padded / t_prefill

    report = {
        "n_questions": len(questions), "k": args.k, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "batched_s": round(t_batched, 2), "one_by_one_s": round(t_single, 2), "speedup": round(t_single / t_batched, 2),
        "identical_outputs": f"{same}/{len(questions)}",
        "prefill_padding_fraction": round(1 - real / padded, 4),
        "prefill_tokens_per_s": round(padded / t_prefill, 1),
        "prefill_flops": prefill_flops, "matmul_peak_flops": peak, "matmul_peak_samples": peaks, "prefill_fraction_of_peak": round(prefill_flops / peak, 3),
    }
    for key, value in report.items():
        print(f"{key:>26}: {value:.3e}" if isinstance(value, float) and value > 1e6 else f"{key:>26}: {value}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
