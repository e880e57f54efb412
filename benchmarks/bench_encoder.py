"""Dense corpus encoding: sentence-transformers float32 vs CTranslate2 int8 (`retriever.encoder_backend`), side by side.

    python benchmarks/bench_encoder.py [--n-dev 300] [--n-corpus 10000]

The same passages go through both engines in one process, each timed best of one pass over the whole
corpus (encoding dominates; both see the same texts, batch size 64, max length 256):
- passages/s of each engine and their ratio, against the float32 and int8 GEMM peaks measured in the
  same run (`rag_lab.flops.measure_peaks`): how close each is to its physical limit;
- agreement: cosine of each passage's int8 embedding to its float32 one (mean, min), and the overlap of
  the top-20 passages each retrieves for the dev questions;
- answer recall@20 on a dev split (seeded questions of the train split, never the eval split) over a
  corpus of `n_corpus` NQ-mini 2 passages: the gold passages of those questions' pool plus a seeded
  sample of the rest (so the figure is a retrieval of the kind the lab does, at a size both engines
  encode in minutes), with the paired difference int8 - float32 (bootstrap CI).
Writes benchmarks/results/encoder.json.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from rag_lab.data import load_corpus, load_qa
from rag_lab.data.subsets import subset_questions
from rag_lab.io import write_json
from rag_lab.metrics import AnswerInPassage, paired_bootstrap_test
from rag_lab.models import load_sentence_encoder
from rag_lab.retrievers.ct2_encoder import CT2SentenceEncoder
from rag_lab.flops import count_params, encoder_flops, measure_peaks

OUT = Path(__file__).resolve().parent / "results" / "encoder.json"


def corpus_sample(n_corpus: int, questions, seed: int = 0):
    """The questions' gold passages plus a seeded sample of other NQ-mini 2 passages, in corpus order."""
    corpus = load_corpus("nq-mini")
    gold = set(corpus.rows_of([q.gold_passage_id for q in questions if q.gold_passage_id]).tolist())
    rest = [i for i in range(len(corpus)) if i not in gold]
    rows = sorted(gold | set(random.Random(seed).sample(rest, n_corpus - len(gold))))
    return corpus.select(rows)


def timed_encode(model, texts, batch_size: int = 64):
    t = time.perf_counter()
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32), time.perf_counter() - t


def recall_at(vecs, qvecs, passages, questions, k: int = 20):
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    _, rows = index.search(qvecs, k)
    holds = AnswerInPassage()
    hits = np.array([float(holds.any(q.answers, passages.take(r))) for q, r in zip(questions, rows)])
    return hits, rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-dev", type=int, default=300, help="dev questions (seeded, from the train split)")
    ap.add_argument("--n-corpus", type=int, default=10_000, help="passages encoded by each engine")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args(argv)
    pool = load_qa("nq-mini", "train")
    dev = subset_questions(pool, args.n_dev, seed=0)
    passages = corpus_sample(args.n_corpus, pool)
    texts = passages.texts()
    print(f"{len(texts):,} passages, {len(dev)} dev questions (train split)", file=sys.stderr)
    peaks = measure_peaks()
    st = load_sentence_encoder("all-minilm-l6-v2")
    st.max_seq_length = 256
    ct2 = CT2SentenceEncoder("all-minilm-l6-v2", "int8", 256)
    tokens = sum(map(len, ct2.tokenizer(texts, truncation=True, max_length=256)["input_ids"]))
    flops = encoder_flops(count_params(st[0].auto_model), tokens)
    out = {"n_passages": len(texts), "n_dev": len(dev), "k": args.k, "tokens": tokens, "flops": flops,
           "peaks": peaks, "engines": {}}
    results = {}
    peak = {"float32": peaks["float32_gflops"] * 1e9, "int8": peaks["int8_gops"] * 1e9}
    for name, model, precision in (("sentence-transformers float32", st, "float32"), ("ctranslate2 int8", ct2, "int8")):
        vecs, seconds = timed_encode(model, texts)
        qvecs, _ = timed_encode(model, [q.question for q in dev])
        hits, rows = recall_at(vecs, qvecs, passages, dev, args.k)
        results[name] = (vecs, hits, rows)
        out["engines"][name] = {"seconds": round(seconds, 1), "passages_per_s": round(len(texts) / seconds, 1),
                                "x_floor": round(seconds / (flops / peak[precision]), 2), f"recall@{args.k}": float(hits.mean())}
        print(name, out["engines"][name], file=sys.stderr)
    (f32, h32, r32), (i8, h8, r8) = results["sentence-transformers float32"], results["ctranslate2 int8"]
    cos = (f32 * i8).sum(axis=1)
    diff = paired_bootstrap_test(h8, h32)
    out["speedup"] = round(out["engines"]["ctranslate2 int8"]["passages_per_s"] / out["engines"]["sentence-transformers float32"]["passages_per_s"], 2)
    out["agreement"] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                        f"top{args.k}_overlap": float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(r32, r8)])),
                        f"recall@{args.k}_diff": diff["diff"], "diff_ci": [diff["ci_low"], diff["ci_high"]], "p_bootstrap": diff["p_value"]}
    write_json(OUT, out)
    print(f"int8 / float32 passages/s: {out['speedup']}x; {out['agreement']}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
