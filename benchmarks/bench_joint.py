"""End-to-end RAG and Fusion-in-Decoder: cost per training step and peak memory, side by side.

    python benchmarks/bench_joint.py [--steps 3] [--questions 4] [--k 5]

1. One optimiser step on the same `--questions` NQ-mini train questions with their dense top-k
   passages (SmolLM2-135M reader, MiniLM query encoder, float32): RAG fine-tuning on the k passages
   concatenated (`train_generator`'s loss) against RAG-Sequence, RAG-Token and perplexity
   distillation (`JointRAG`: k prompts of one passage each, the query encoder trained too). Step
   seconds, tokens read per step, and each mode's peak RSS (a child process per mode).
2. Fusion-in-Decoder against a concatenated-passage encoder-decoder at k = 5 and 10: a T5-small-shaped
   model (random weights: the cost of a step does not depend on their values, and no T5 checkpoint is
   reachable offline), 150-token passages + a 20-token question, batch 4; encoder seconds and the
   training step (forward + backward). FiD's encoder reads k short sequences (linear in k); the
   concatenation reads one long one (attention quadratic in its length).

Writes benchmarks/results/joint.json; the float32 matmul peak is measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import matmul_peak_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "joint.json"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def joint_mode(mode: str, n_questions: int, k: int, steps: int) -> dict:
    import torch

    from rag_lab.config import GeneratorConfig, RetrieverConfig
    from rag_lab.data import load_corpus, load_qa
    from rag_lab.generators import prompt_builder
    from rag_lab.generators.fusion import answer_logprobs
    from rag_lab.models import load_causal_lm
    from rag_lab.runner import passage_index
    from rag_lab.training.joint import load_joint_model

    torch.manual_seed(0)
    questions = load_qa("nq-mini", "train")[:n_questions]
    index = passage_index(RetrieverConfig(kind="dense", k=k), load_corpus("nq-mini"), show_progress=False)
    generator = GeneratorConfig(max_context_tokens=None)
    if mode == "concat":  # the rag_ft step: the same top-k (found by the same encoder), one prompt
        model, tokenizer = load_causal_lm(generator.model)
        builder = prompt_builder(generator, tokenizer)
        joint = load_joint_model(generator, index, "rag_sequence", k, 0.05, 1.0)
        with torch.no_grad():
            _, rows = joint.doc_scores(questions)
        del joint
        prompts = [builder.rag(q, [index.passages[j] for j in row]).text for q, row in zip(questions, rows)]
        answers = [q.answers[0] for q in questions]
        params = list(model.parameters())

        def loss():
            logp, mask = answer_logprobs(model, tokenizer, prompts, answers, not builder.use_chat)
            return -(logp * mask).sum(-1).mean()
        tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
        model.train()
    else:
        model = load_joint_model(generator, index, mode, k, 0.05, 1.0).train()
        params = list(model.parameters())
        with torch.no_grad():
            _, rows = model.doc_scores(questions)
        per_passage = [model.builder.rag(q, [index.passages[j]]).text for q, row in zip(questions, rows) for j in row]
        tokens = sum(len(model.tokenizer(p)["input_ids"]) for p in per_passage)
        if mode == "pdist":  # its reader also reads the concatenated prompt
            tokens += sum(len(model.tokenizer(model.builder.rag(q, [index.passages[j] for j in row]).text)["input_ids"])
                          for q, row in zip(questions, rows))

        def loss():
            return model(questions)["loss"]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for step in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    return {"mode": mode, "questions": n_questions, "k": k, "step_s": round(best, 2), "tokens_per_step": tokens,
            "tokens_per_s": round(tokens / best, 1), "peak_rss_gb": peak_rss_gb()}


def fid_mode(k: int, steps: int, passage_len: int = 150, question_len: int = 20, batch: int = 4) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from rag_lab.generators.fid import FiDModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                      decoder_start_token_id=0, pad_token_id=0)  # t5-small's shape
    model = T5ForConditionalGeneration(config)
    fid = FiDModel(model)
    ids = torch.randint(1, 32000, (batch, k, passage_len + question_len))
    mask = torch.ones_like(ids)
    long_ids = torch.randint(1, 32000, (batch, k * passage_len + question_len))
    labels = torch.randint(1, 32000, (batch, 6))

    def timed(fn, n=steps):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return round(min(out), 3)

    with torch.no_grad():
        fid_enc = timed(lambda: model.get_encoder()(input_ids=ids.view(batch * k, -1), attention_mask=mask.view(batch * k, -1)))
        cat_enc = timed(lambda: model.get_encoder()(input_ids=long_ids))

    def step(fn):
        def run():
            model.zero_grad()
            fn().loss.backward()
        return run
    fid_step = timed(step(lambda: fid(ids, mask, labels=labels)))
    cat_step = timed(step(lambda: model(input_ids=long_ids, labels=labels)))
    return {"k": k, "encoder_tokens": batch * k * (passage_len + question_len), "fid_encoder_s": fid_enc, "concat_encoder_s": cat_enc,
            "fid_step_s": fid_step, "concat_step_s": cat_step, "encoder_ratio_concat_over_fid": round(cat_enc / fid_enc, 2),
            "peak_rss_gb": peak_rss_gb()}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, value = args.child[0], args.child[1]
        result = fid_mode(int(value), args.steps) if kind == "fid" else joint_mode(value, args.questions, args.k, args.steps)
        print(json.dumps(result))
        return
    report = {"matmul_peak_gflops": round(matmul_peak_flops() / 1e9, 1), "joint": [], "fid": [],
              "note": "step_s: best of --steps optimiser steps after one warm-up; peak RSS of each mode's own process"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for m in ("concat", "rag_sequence", "rag_token", "pdist"):
        report["joint"].append(child(["--steps", str(args.steps), "--questions", str(args.questions), "--k", str(args.k),
                                      "--child", "joint", m]))
        report["joint"][-1]["step_vs_concat"] = round(report["joint"][-1]["step_s"] / report["joint"][0]["step_s"], 2)
        print(json.dumps(report["joint"][-1]), flush=True)
    for k in (5, 10):
        report["fid"].append(child(["--steps", str(args.steps), "--child", "fid", str(k)]))
        print(json.dumps(report["fid"][-1]), flush=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
