"""Generator fine-tuning throughput and memory on SmolLM2-135M (the default reader).

    python benchmarks/bench_training.py [--steps 6] [--batch-size 8]

Side by side in one run: the float32 matmul peak (sampled before and after every mode; the best
sample is the reference); full fine-tuning (a hand-written loop, and the same through
`generator_trainer`, the Hugging Face Trainer `train_generator` runs) and LoRA step time,
non-pad tokens/s, and achieved FLOP/s (6 x params x tokens for full; LoRA skips the weight
gradients: ~4 x params x tokens) as a fraction of the peak; the padding fraction of an epoch
of closed-book and RAG training batches with and without length grouping; peak RSS of each
mode, measured in a child process per mode; full fine-tuning with gradient checkpointing on the
RAG prompts (the memory option `training.gradient_checkpointing`).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def training_examples(tok, n: int | None, rag: bool) -> list[dict]:
    """SFT examples from the first n NQ-mini train questions, with the default prompts (RAG: BM25 top-3)."""
    from rag_lab.config import ExperimentConfig
    from rag_lab.data import load_qa
    from rag_lab.generators import PromptBuilder
    from rag_lab.training.generator import build_sft_examples

    g = ExperimentConfig().generator
    builder = PromptBuilder(tok, g.closed_book_template, g.rag_template, g.system_prompt, (), True, g.max_input_tokens)
    train = load_qa("nq-mini", "train")[:n]
    if rag:
        from rag_lab.config import RetrieverConfig
        from rag_lab.data import load_corpus
        from rag_lab.pipeline import contexts

        passages = load_corpus("nq-mini")
        ctx = contexts(RetrieverConfig(kind="bm25"), passages, 3, train, show_progress=False)[0].passages
        prompts = [builder.rag(q, c).text for q, c in zip(train, ctx)]
    else:
        prompts = [builder.closed_book(q).text for q in train]
    return build_sft_examples(prompts, [q.answers[0] for q in train], tok)[0]


def child(mode: str, steps: int, batch_size: int, rag: bool) -> None:
    """One mode in a fresh process: time `steps` optimiser steps on real NQ-mini training prompts."""
    import torch

    from rag_lab.flops import count_params
    from rag_lab.models import load_causal_lm
    from rag_lab.training.common import TrainSettings, pad_collate
    from rag_lab.training.generator import apply_lora

    model, tok = load_causal_lm("smollm2-135m-instruct")
    examples = training_examples(tok, steps * batch_size, rag)
    n_params = count_params(model)  # SmolLM2 ties its head to the embeddings: the same N as a plain numel sum
    if mode == "trainer":
        return trainer_child(model, tok, examples, batch_size, n_params, rag)
    if mode == "lora":
        model = apply_lora(model, TrainSettings())
    if mode == "full-gc":  # training.gradient_checkpointing: recompute activations in the backward pass
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collate = pad_collate(tok.pad_token_id)
    batches = [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
            tokens += int(batch["attention_mask"].sum())
    step_s = sum(times) / len(times)
    print(json.dumps({"mode": mode, "rag": rag, "step_s": step_s, "tokens_per_s": tokens / sum(times),
                      "n_params": n_params, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def trainer_child(model, tok, examples: list[dict], batch_size: int, n_params: int, rag: bool) -> None:
    """Full fine-tuning through `generator_trainer`, the Trainer `train_generator` runs (its
    arguments, collator and loss: the LM head at answer positions only; length-grouped batches,
    linear schedule, grad clipping). Steps are timed by a callback."""
    import tempfile

    from transformers import TrainerCallback

    from rag_lab.training.common import TrainSettings
    from rag_lab.training.generator import generator_trainer

    step_tokens, step_head_rows = [], []

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t)

    timer = StepTimer()
    settings = TrainSettings(learning_rate=1e-5, epochs=1, batch_size=batch_size, eval_steps=10**6, save_optimizer=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = generator_trainer(model, tok, examples, Path(out), settings)
        collate = trainer.data_collator

        def counting_collate(batch):  # batches reach the collator in step order (no dataloader workers)
            out = collate(batch)
            step_tokens.append(int(out["attention_mask"].sum()))
            step_head_rows.append(len(batch) * len(out["logits_to_keep"]))  # rows the LM head computes
            return out

        trainer.data_collator = counting_collate
        trainer.add_callback(timer)
        trainer.train()
    times, tokens = timer.times[1:], sum(step_tokens[1:len(timer.times)])  # the first step warms up
    head_rows = sum(step_head_rows[1:len(timer.times)])
    print(json.dumps({"mode": "trainer", "rag": rag, "step_s": sum(times) / len(times), "tokens_per_s": tokens / sum(times),
                      "n_params": n_params, "head_rows_per_s": head_rows / sum(times),
                      "n_head_params": model.get_output_embeddings().weight.numel(), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def answer_logits_ab(steps: int, batch_size: int, rounds: int = 3) -> dict:
    """The LM head at every position vs at answer positions only, side by side: forward + backward
    on the same batches, alternating between the two in one process (no optimiser step, so both
    see the same weights); best round of each. Closed-book prompts."""
    import torch

    from rag_lab.models import load_causal_lm
    from rag_lab.training.generator import answer_logits_collate, answer_logits_loss

    model, tok = load_causal_lm("smollm2-135m-instruct")
    collate = answer_logits_collate(tok.pad_token_id)
    examples = training_examples(tok, steps * batch_size, False)
    batches = [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    model.train()

    def every_position(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def answer_positions(b):
        return answer_logits_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                        logits_to_keep=b["logits_to_keep"]), b["labels"])

    best = {"every_position_s": math.inf, "answer_positions_s": math.inf}
    for _ in range(rounds):
        for key, loss_of in (("every_position_s", every_position), ("answer_positions_s", answer_positions)):
            t = time.perf_counter()
            for b in batches:
                loss_of(b).backward()
                model.zero_grad(set_to_none=True)
            best[key] = min(best[key], time.perf_counter() - t)
    kept = sum(len(b["logits_to_keep"]) * len(b["input_ids"]) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return {**best, "batches": len(batches), "batch_size": batch_size, "head_rows_kept_fraction": kept / total,
            "speedup": best["every_position_s"] / best["answer_positions_s"], "threads": torch.get_num_threads()}


def padding(rag: bool, batch_size: int) -> dict:
    from rag_lab.models import load_causal_lm
    from rag_lab.training.generator import padding_fraction

    examples = training_examples(load_causal_lm("smollm2-135m-instruct")[1], None, rag)
    return {"random": padding_fraction(examples, batch_size, False), "grouped": padding_fraction(examples, batch_size, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--_child", nargs=2, metavar=("MODE", "RAG"))
    ap.add_argument("--answer-logits", action="store_true",
                    help="only the LM-head A/B (every position vs answer positions) -> results/training_answer_logits.json")
    args = ap.parse_args()
    if args._child:
        return child(args._child[0], args.steps, args.batch_size, args._child[1] == "rag")
    if args.answer_logits:
        from rag_lab.io import write_json

        report = answer_logits_ab(args.steps, args.batch_size)
        print(json.dumps(report, indent=1))
        return write_json(Path(__file__).parent / "results" / "training_answer_logits.json", report)

    from _common import matmul_peak_flops

    from rag_lab.io import write_json

    # the CPU's matmul rate drifts (frequency, neighbours): sample it before and after every mode and
    # take the best sample as the reference, so no fraction is flattered by a slow moment
    peaks = [matmul_peak_flops()]
    report = {"batch_size": args.batch_size, "modes": []}
    for mode, rag in (("full", False), ("trainer", False), ("lora", False), ("full", True), ("full-gc", True)):
        out = subprocess.run([sys.executable, __file__, "--_child", mode, "rag" if rag else "closed",
                              "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        report["modes"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        peaks.append(matmul_peak_flops())
    peak = max(peaks)
    report.update(matmul_peak_flops=peak, matmul_peak_samples=peaks)
    print(f"matmul peak samples (GFLOP/s): {' '.join(f'{p / 1e9:.0f}' for p in peaks)}; reference = the best")
    for row in report["modes"]:
        # full: forward 2N + backward 4N per token; LoRA skips the frozen weights' gradients (4N);
        # gradient checkpointing recomputes the forward (8N), but its useful work is still 6N
        flops_per_token = (4 if row["mode"] == "lora" else 6) * row["n_params"]
        flops = flops_per_token * row["tokens_per_s"]
        if "head_rows_per_s" in row:  # the trainer runs the LM head at answer positions only: count what it executes
            flops += 6 * row["n_head_params"] * (row["head_rows_per_s"] - row["tokens_per_s"])
        row["fraction_of_peak"] = flops / peak
        print(f"{row['mode']:>7} {'rag' if row['rag'] else 'closed-book':<11} step {row['step_s']:.2f} s  {row['tokens_per_s']:.0f} tok/s  "
              f"{row['fraction_of_peak']:.1%} of the {peak / 1e9:.0f} GFLOP/s matmul peak  peak RSS {row['peak_rss_gb']:.2f} GB")
    for rag in (False, True):
        pad = padding(rag, args.batch_size)
        report[f"padding_{'rag' if rag else 'closed_book'}"] = pad
        print(f"padding fraction ({'rag' if rag else 'closed-book'}): random batches {pad['random']:.1%}, length-grouped {pad['grouped']:.1%}")
    write_json(Path(__file__).parent / "results" / "training.json", report)


if __name__ == "__main__":
    main()
