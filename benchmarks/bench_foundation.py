"""Foundation figures: building NQ-mini, loading it, scoring 3,610 predictions.

    python benchmarks/bench_foundation.py

Targets (issue 2): build <= 30 s, corpus load <= 2 s, EM/F1 over 3,610 predictions <= 1 s.
The SmolLM2 load ratio (GGUF vs safetensors cache) is benchmarks/bench_model_load.py.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rag_lab.data import build_nq_mini
from rag_lab.data.loaders import load_corpus_file, load_qa_file
from rag_lab.io import write_json
from rag_lab.metrics import score_predictions
from rag_lab.paths import data_dir


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    folder = data_dir() / "nq_mini"
    with tempfile.TemporaryDirectory() as tmp:
        manifest, t_build = timed(lambda: build_nq_mini.write(build_nq_mini.build(), Path(tmp)))
    corpus, t_corpus = timed(lambda: load_corpus_file(folder / "corpus.jsonl.gz"))
    questions, t_eval = timed(lambda: load_qa_file(folder / "eval.jsonl"))
    # realistic predictions: the first gold answer for half the questions, a wrong phrase for the rest
    preds = [q.answers[0] if i % 2 else f"the {q.question.split()[-1]}" for i, q in enumerate(questions)]
    _, t_score = timed(lambda: score_predictions(preds, [q.answers for q in questions]))
    report = {"build_s": round(t_build, 2), "build_hashes_match_committed": manifest["files"] == build_nq_mini.validate()["files"],
              "corpus_load_s": round(t_corpus, 3), "n_passages": len(corpus), "eval_load_s": round(t_eval, 3),
              "score_3610_s": round(t_score, 3)}
    for k, v in report.items():
        print(f"{k:>30}: {v}")
    write_json(Path(__file__).parent / "results" / "foundation.json", report)


if __name__ == "__main__":
    main()
