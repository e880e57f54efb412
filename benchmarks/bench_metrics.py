"""Time rag_lab.metrics against a naive loop over the official SQuAD v1.1 functions.

    python benchmarks/bench_metrics.py

Gold answers are real (NQ-mini eval split if built, else NQ-open dev); predictions are
synthetic but shaped like reader outputs: exact golds, golds with articles/punctuation,
golds inside a sentence, partial answers, another question's answer, empty strings.
"""
from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from rag_lab.metrics import bootstrap_ci, paired_bootstrap_test, score_predictions

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "data" / "nq_mini" / "eval.jsonl", ROOT.parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"]
N = 3610  # size of NQ-open dev


# --- the peer: official SQuAD v1.1 evaluate-v1.1.py functions, plus a naive match -----------

def squad_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_exact_match_score(prediction, ground_truth):
    return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


def naive_match_score(prediction, ground_truth):
    # token-boundary containment, written the obvious way
    p, g = squad_normalize_answer(prediction).split(), squad_normalize_answer(ground_truth).split()
    return any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1))


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def naive_score(predictions, answers):
    em, f1, match = [], [], []
    for p, golds in zip(predictions, answers):
        em.append(float(metric_max_over_ground_truths(squad_exact_match_score, p, golds)))
        f1.append(float(metric_max_over_ground_truths(squad_f1_score, p, golds)))
        match.append(float(metric_max_over_ground_truths(naive_match_score, p, golds)))
    return {"em": em, "f1": f1, "match": match}


def naive_bootstrap(values, n_boot=1000, seed=0):
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


# --- data ------------------------------------------------------------------------------------

def load_answers() -> tuple[Path, list[list[str]]]:
    """Gold answer lists from the first source that exists, cycled to N questions."""
    path = next(p for p in SOURCES if p.exists())
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [list(r.get("answers", r.get("answer"))) for r in rows]
    return path, [answers[i % len(answers)] for i in range(N)]


def synth_predictions(answers: list[list[str]], seed: int = 0) -> list[str]:
    """One reader-like prediction per question."""
    rng = random.Random(seed)
    preds = []
    for golds in answers:
        gold, other = rng.choice(golds), rng.choice(rng.choice(answers))
        kind = rng.random()
        if kind < 0.30:
            preds.append(gold)
        elif kind < 0.45:
            preds.append(f"The {gold}.")
        elif kind < 0.65:
            preds.append(f"I think the answer is {gold}, according to the passage about it.")
        elif kind < 0.75:
            preds.append(gold.split()[0] if gold.split() else gold)
        elif kind < 0.97:
            preds.append(other)
        else:
            preds.append("")
    return preds


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best wall time of `repeat` runs, in seconds (best-of filters scheduler noise)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    path, answers = load_answers()
    preds = synth_predictions(answers)
    print(f"answers from {path} ({N} questions)")

    ours, peer = score_predictions(preds, answers), naive_score(preds, answers)
    # The only intended difference: golds that normalise to "" (e.g. "---") match nothing here.
    empty_gold = np.array([any(not squad_normalize_answer(g) for g in golds) for golds in answers])
    for key in ("em", "f1", "match"):
        differ = ours[key] != np.array(peer[key])
        print(f"  {key:5s} ours {ours[key].mean():.4f}  peer {np.mean(peer[key]):.4f}  "
              f"questions differing: {differ.sum()} (of which with an empty gold: {(differ & empty_gold).sum()})")

    t_ours = best_of(lambda: score_predictions(preds, answers))
    t_peer = best_of(lambda: naive_score(preds, answers))
    print(f"score_predictions (EM+F1+match): {t_ours * 1e3:8.1f} ms")
    print(f"naive official-script loop:      {t_peer * 1e3:8.1f} ms   (ours is {t_peer / t_ours:.1f}x faster)")

    em = ours["em"]
    t_ci = best_of(lambda: bootstrap_ci(em, n_boot=1000))
    t_naive_ci = best_of(lambda: naive_bootstrap(list(em), n_boot=1000), repeat=1)
    other = np.roll(em, 1)  # a second "system" for the paired test
    t_paired = best_of(lambda: paired_bootstrap_test(em, other, n_boot=10000), repeat=3)
    mean, low, high = bootstrap_ci(em, n_boot=1000)
    print(f"bootstrap_ci n_boot=1000:        {t_ci * 1e3:8.1f} ms   EM {mean:.4f} [{low:.4f}, {high:.4f}]")
    print(f"naive bootstrap loop n_boot=1000:{t_naive_ci * 1e3:8.1f} ms   (ours is {t_naive_ci / t_ci:.1f}x faster)")
    print(f"paired_bootstrap_test n_boot=10000: {t_paired * 1e3:5.1f} ms")


if __name__ == "__main__":
    main()
