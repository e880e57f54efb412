"""transformers (float32) vs CTranslate2 (int8) for the packaged readers, side by side in one process.

    python benchmarks/bench_backends.py [--n 64] [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]

For each reader and each prompt kind (closed-book; RAG with the top-3 BM25 passages, ~400-token
prompts), the same questions and prompts go through both backends with the same batch plan:
questions/s, prefill tokens/s (the prompt alone: one forward step), decode tokens/s (the rest),
and prefill as a fraction of the GEMM peak of its precision, float32 and int8 measured in the
same run (`rag_lab.flops.measure_peaks`). Agreement with transformers: identical raw outputs,
identical cleaned predictions, and the same EM verdict. Writes benchmarks/results/backends.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from rag_lab.config import GeneratorConfig
from rag_lab.data import load_corpus, load_qa
from rag_lab.data.subsets import subset_questions
from rag_lab.generators import build_generator, length_sorted_batches
from rag_lab.io import write_json
from rag_lab.metrics import score_predictions
from rag_lab.models import resolve_model
from rag_lab.flops import checkpoint_params, measure_peaks


def prefill_seconds(gen, prompts) -> float:
    """The prompt's forward pass alone, over the same length-sorted batches `generate` uses."""
    batches = length_sorted_batches([p.n_tokens for p in prompts], gen.batch_size)
    add_special = not gen.builder.use_chat
    t = time.perf_counter()
    for batch in batches:
        texts = [prompts[i].text for i in batch]
        if gen.model is not None:  # transformers: logits at the last position only, as generate() does
            enc = gen.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            with torch.inference_mode():
                gen.model(**enc, logits_to_keep=1)
        else:  # CTranslate2: a one-token generation is the prefill plus one LM-head step
            ids = [gen.tokenizer.convert_ids_to_tokens(gen.tokenizer(x, add_special_tokens=add_special)["input_ids"]) for x in texts]
            gen.generator.generate_batch(ids, max_length=1, sampling_topk=1, include_prompt_in_result=False)
    return time.perf_counter() - t


def measure(model: str, backend: str, questions, contexts, batch_size: int) -> dict:
    gen = build_generator(GeneratorConfig(model=model, backend=backend, batch_size=batch_size, max_new_tokens=16))
    prompts = gen.prompts(questions, contexts)
    t = time.perf_counter()
    preds = gen.generate(questions, contexts)
    total = time.perf_counter() - t
    prefill = min(prefill_seconds(gen, prompts) for _ in range(2))
    prompt_tokens = sum(p.n_tokens for p in prompts)
    new_tokens = sum(len(gen.tokenizer(p["raw"], add_special_tokens=False)["input_ids"]) for p in preds)
    n_params = checkpoint_params(resolve_model(model))
    precision = "int8" if backend == "ctranslate2" else "float32"
    return {"backend": backend, "precision": precision, "total_s": round(total, 2), "questions_per_s": round(len(questions) / total, 3),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_s": round(prefill, 2),
            "prefill_tokens_per_s": round(prompt_tokens / prefill, 1),
            "decode_tokens_per_s": round(new_tokens / max(total - prefill, 1e-9), 1),
            "prefill_gflops": round(2 * n_params * prompt_tokens / prefill / 1e9, 1), "preds": preds}


def agreement(reference: list[dict], other: list[dict], questions) -> dict:
    em_ref = score_predictions([p["prediction"] for p in reference], [q.answers for q in questions])["em"]
    em_other = score_predictions([p["prediction"] for p in other], [q.answers for q in questions])["em"]
    n = len(reference)
    return {"identical_raw": round(sum(a["raw"] == b["raw"] for a, b in zip(reference, other)) / n, 3),
            "identical_prediction": round(sum(a["prediction"] == b["prediction"] for a, b in zip(reference, other)) / n, 3),
            "same_em_verdict": round(float((em_ref == em_other).mean()), 3),
            "em_transformers": round(float(em_ref.mean()), 3), "em_other": round(float(em_other.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--k", type=int, default=3, help="BM25 passages in the RAG prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--prompts", nargs="+", choices=["closed-book", "rag"], default=["closed-book", "rag"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backends.json")
    args = ap.parse_args()

    from rag_lab.config import RetrieverConfig
    from rag_lab.pipeline import contexts

    peaks_before = dict(measure_peaks.__wrapped__())  # a fresh sample before, and one after, the timed parts
    questions = subset_questions(load_qa("nq-mini", "eval"), args.n, seed=1)
    passages = load_corpus("nq-mini")
    (bm25,) = contexts(RetrieverConfig(kind="bm25"), passages, args.k, questions, show_progress=False)
    rag_contexts = bm25.passages
    report = {"n_questions": len(questions), "k": args.k, "batch_size": args.batch_size, "threads": torch.get_num_threads(), "runs": []}
    for model in args.models:
        for kind, contexts in (("closed-book", None), (f"rag k={args.k}", rag_contexts)):
            if kind.split(" ")[0] not in args.prompts:
                continue
            ref = measure(model, "transformers", questions, contexts, args.batch_size)
            fast = measure(model, "ctranslate2", questions, contexts, args.batch_size)
            row = {"model": model, "prompts": kind, "transformers": {k: v for k, v in ref.items() if k != "preds"},
                   "ctranslate2": {k: v for k, v in fast.items() if k != "preds"},
                   "speedup_questions": round(ref["total_s"] / fast["total_s"], 2),
                   "speedup_decode": round(fast["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 2),
                   "speedup_prefill": round(fast["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"], 2),
                   "agreement": agreement(ref["preds"], fast["preds"], questions)}
            report["runs"].append(row)
            print(f"{model:<28} {kind:<11} questions/s {ref['questions_per_s']:.2f} -> {fast['questions_per_s']:.2f} "
                  f"({row['speedup_questions']}x) | prefill tok/s {ref['prefill_tokens_per_s']} -> {fast['prefill_tokens_per_s']} "
                  f"| decode tok/s {ref['decode_tokens_per_s']} -> {fast['decode_tokens_per_s']} ({row['speedup_decode']}x) "
                  f"| agreement {row['agreement']}", flush=True)
            write_json(args.out, report)  # after every row: a stopped run keeps what it measured
    peaks_after = dict(measure_peaks.__wrapped__())
    report["peaks"] = {"float32_gflops": max(peaks_before["float32_gflops"], peaks_after["float32_gflops"]),
                       "int8_gops": max(peaks_before["int8_gops"], peaks_after["int8_gops"]), "samples": [peaks_before, peaks_after]}
    for row in report["runs"]:
        for backend in ("transformers", "ctranslate2"):
            r = row[backend]
            peak = report["peaks"]["int8_gops" if r["precision"] == "int8" else "float32_gflops"]
            r["prefill_of_gemm_peak"] = round(r["prefill_gflops"] / peak, 3)
    print("peaks:", {k: round(v, 1) for k, v in report["peaks"].items() if k != "samples"})
    for row in report["runs"]:
        print(f"{row['model']:<28} {row['prompts']:<11} prefill of its GEMM peak: transformers "
              f"{row['transformers']['prefill_of_gemm_peak']}, ctranslate2 {row['ctranslate2']['prefill_of_gemm_peak']}")
    write_json(args.out, report)


if __name__ == "__main__":
    sys.exit(main())
