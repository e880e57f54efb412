"""Scale benchmark (issue 15): time and peak RSS of every index-building stage at 100k, 1M and 5M
passages on this machine, today's path against the previous in-memory design, and the extrapolation
to the 21M-passage DPR Wikipedia.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale.py                       # 100k, 1M, 5M (~1.5 h on 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale.py --sizes 20000 --old-sizes 20000   # a quick look

Corpus: synthetic, from the real nq-mini passages: each passage is sentences drawn at random from
the whole nq-mini corpus (seeded) until it reaches a length drawn from the real passages' word
counts, under a real title and a fresh id, so lengths and vocabulary are realistic (the text is
not). Every stage runs in a fresh subprocess and reports its own peak RSS (`ru_maxrss`: it counts
the pages of memory-mapped files the stage touched, so it is an upper bound on what the stage
needs), and its wall time.

Stages (ours): `arrow` (jsonl -> Arrow, streamed), `bm25_build` (chunked bm25s index),
`bm25_search` (1,000 nq-mini eval questions, k=10, on the memory-mapped index), `encode` (dense
encoding into float16 shards, one shard per 500k rows, with a deliberately tiny encoder: a random
1-layer, 64-dim BERT over all-MiniLM-L6-v2's real WordPiece tokenizer, 64 tokens; the point is
memory and I/O, not quality), `ivfpq_build` (IVF-PQ trained on a seeded sample, vectors added shard
by shard) and `ivfpq_search` (1,000 questions, nprobe 32, index memory-mapped).
Stages (the previous design, run at `--old-sizes`): `old_corpus` (the corpus as a list of
`Passage`), `old_bm25` (that list, `bm25s.tokenize` + `index` of the whole corpus in memory, saved),
`old_dense` (that list, one `encode` call over all texts into float32, the BytesIO copy the old
cache writer made, a Flat index in memory).
Writes `benchmarks/results/scale.json` and `benchmarks/results/scale.png` (log-log time and memory).
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results"
SHARD_ROWS = 500_000
N_QUERIES = 1000


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------- inputs

def make_corpus(n: int, path: Path, seed: int = 0) -> dict:
    """The synthetic corpus (jsonl): real sentences reshuffled, real titles, real lengths, fresh ids."""
    from rag_lab.data import load_corpus

    real = list(load_corpus("nq-mini"))
    sentences = [s for p in real for s in re.split(r"(?<=[.!?])\s+", p.text) if s]
    words = np.array([len(s.split()) for s in sentences])
    lengths = np.array([len(p.text.split()) for p in real])
    titles = [p.title for p in real]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            target = rng.choice(lengths, m)
            picks = rng.integers(0, len(sentences), (m, 24))
            cum = np.cumsum(words[picks], axis=1)
            count = np.minimum((cum < target[:, None]).sum(axis=1) + 1, 24)
            title = rng.integers(0, len(titles), m)
            lines = []
            for i in range(m):
                text = " ".join(sentences[j] for j in picks[i, :count[i]])
                lines.append(json.dumps({"id": f"syn-{start + i:08d}", "title": titles[title[i]], "text": text}))
            f.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return {"passages": n, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
            "mean_words": float(lengths.mean())}


def tiny_encoder(path: Path) -> str:
    """A random 1-layer, 64-dim BERT with all-MiniLM-L6-v2's tokenizer, as a sentence-transformers folder."""
    if (path / "modules.json").exists():
        return str(path)
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rag_lab.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("all-minilm-l6-v2")))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(path / "bert"))
    tok.save_pretrained(str(path / "bert"))
    model = SentenceTransformer(modules=[models.Transformer(str(path / "bert"), max_seq_length=64),
                                         models.Pooling(64, "mean")], device="cpu")
    model.save(str(path))
    return str(path)


def nlist_for(n: int) -> int:
    return 2 ** max(6, round(math.log2(4 * math.sqrt(n))))


# ---------------------------------------------------------------- stages (each in its own process)

def stage(name: str, n: int, work: Path) -> dict:
    os.environ["RAG_LAB_CACHE"] = str(work / f"cache-{n}")
    source = work / f"corpus-{n}.jsonl"
    from rag_lab.config import RetrieverConfig

    encoder = str(work / "tiny-encoder")
    dense_cfg = RetrieverConfig(kind="dense", encoder=encoder, max_length=64, embedding_dtype="float16",
                                encode_batch_size=256, index_factory=f"IVF{nlist_for(n)},PQ16np", search_params="nprobe=32")
    out: dict = {}
    t0 = time.perf_counter()
    if name == "baseline":  # what importing the stages' modules alone costs: the floor under every stage's peak
        import rag_lab.data.corpus  # noqa: F401
        import rag_lab.pipeline  # noqa: F401
        import rag_lab.retrievers  # noqa: F401
    elif name == "arrow":
        from rag_lab.data.corpus import file_corpus

        corpus = file_corpus(source, show_progress=False)
        out["rows"] = len(corpus)
        out["arrow_bytes"] = (corpus.folder / "passages.arrow").stat().st_size
    elif name in ("bm25_build", "bm25_search"):
        from rag_lab.data.corpus import file_corpus
        from rag_lab.retrievers import BM25Retriever

        corpus = file_corpus(source, show_progress=False)
        t0 = time.perf_counter()
        bm25 = BM25Retriever(corpus, show_progress=False)
        if name == "bm25_search":
            assert bm25.cache_hit, "run bm25_build first"
            questions = _questions()
            t0 = time.perf_counter()
            hits = bm25.retrieve(questions, 10)
            out["queries"] = len(hits)
        else:
            folder = next(Path(os.environ["RAG_LAB_CACHE"], "retrieval").glob("bm25-*"))
            out["index_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    elif name == "encode":
        from rag_lab.data.corpus import file_corpus
        from rag_lab.retrievers import dense_encoder

        corpus = file_corpus(source, show_progress=False)
        enc = dense_encoder(dense_cfg, corpus, show_progress=False)
        n_shards = max(1, -(-n // SHARD_ROWS))
        shards = []
        t0 = time.perf_counter()
        for i in range(n_shards):
            t = time.perf_counter()
            path = enc.encode_shard(i, n_shards)
            rows = np.load(path / "emb.npy", mmap_mode="r").shape[0]
            shards.append({"shard": i, "rows": rows, "seconds": time.perf_counter() - t})
        out["shards"] = shards
        out["embedding_bytes"] = sum((d / "emb.npy").stat().st_size for _, _, d in enc.store.shards())
    elif name in ("ivfpq_build", "ivfpq_search"):
        from rag_lab.data.corpus import file_corpus
        from rag_lab.pipeline import build_index

        corpus = file_corpus(source, show_progress=False)
        t0 = time.perf_counter()
        dense = build_index(dense_cfg, corpus, show_progress=False)
        assert dense.cache_hit["embeddings"], "run encode first"
        out["factory"] = dense_cfg.index_factory
        if name == "ivfpq_search":
            assert dense.cache_hit["index"], "run ivfpq_build first"
            questions = _questions()
            t0 = time.perf_counter()
            out["queries"] = len(dense.retrieve(questions, 10))
        else:
            folder = next(Path(os.environ["RAG_LAB_CACHE"], "retrieval").glob("faiss-*"))
            out["index_bytes"] = (folder / "index.faiss").stat().st_size
    elif name.startswith("old_"):
        out.update(_old_design(name, source, encoder))
        t0 = out.pop("t0")
    else:
        raise SystemExit(f"unknown stage {name}")
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def _questions():
    from rag_lab.data import load_qa

    return load_qa("nq-mini", "eval")[:N_QUERIES]


def _old_design(name: str, source: Path, encoder: str) -> dict:
    """The design before issue 15, as it was: a list of Passage objects, whole-corpus builds in memory."""
    from rag_lab.data.loaders import file_rows
    from rag_lab.data.records import passage_from_row, passage_text

    t0 = time.perf_counter()
    passages = [passage_from_row(row, where, str(i)) for i, (where, row) in enumerate(file_rows(source))]
    out = {"t0": t0}
    if name == "old_bm25":
        import Stemmer
        import bm25s

        index = bm25s.BM25(k1=1.5, b=0.75)
        tokens = bm25s.tokenize([passage_text(p) for p in passages], stopwords="en",
                                stemmer=Stemmer.Stemmer("english").stemWords, show_progress=False)
        index.index(tokens, show_progress=False)
        folder = Path(os.environ["RAG_LAB_CACHE"]) / "old-bm25"
        index.save(str(folder), show_progress=False)
        shutil.rmtree(folder)
    elif name == "old_dense":
        import faiss
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(encoder, device="cpu")
        vecs = np.ascontiguousarray(model.encode([passage_text(p) for p in passages], batch_size=256, normalize_embeddings=True,
                                                 convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
        buf = io.BytesIO()
        np.save(buf, vecs, allow_pickle=False)  # the old cache writer's in-memory copy
        data = buf.getvalue()
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        out["embedding_bytes"] = len(data)
        del data, buf
    out["passages"] = len(passages)
    return out


# ---------------------------------------------------------------- driver

def run_stage(name: str, n: int, work: Path, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--size", str(n), "--workdir", str(work)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "wall_s": time.perf_counter() - t}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = os.getloadavg()[0]
    return result


def fit(sizes, values) -> dict:
    """log-log slope (growth exponent) and the value extrapolated to 21M along it."""
    xs, ys = np.log(np.asarray(sizes, float)), np.log(np.asarray(values, float))
    if len(xs) < 2:
        return {}
    slope, icept = np.polyfit(xs, ys, 1)
    return {"exponent": float(slope), "at_21M": float(math.exp(icept + slope * math.log(21_000_000)))}


# Stated assumptions for the machines not measured here (no GPU was lent for this benchmark):
GPU = {"name": "H100 80GB", "bf16_peak_flops": 989e12, "mfu": 0.30}  # encoder FLOP/s = peak x an assumed utilisation
ENCODER = {"name": "e5-base-v2", "params": 110e6, "tokens_per_passage": 140}  # 2 N FLOP per token (forward)
NODE_CPUS = 64  # cores of an 8-GPU node, for the stages FAISS parallelises (IVF training / adding)
DIM_FACTOR = 768 / 64  # e5-base's vectors against the tiny encoder's: IVF-PQ training and adding scale with the dimension
TARGET = 21_000_000


def extrapolate(results: dict) -> dict:
    """Each stage's time at 21M passages on (a) this machine (from the per-size measurements, along
    the fitted growth), (b) one 8-GPU node and (c) 4 such nodes, under the stated assumptions."""
    growth, stages = results.get("growth", {}), results["stages"]
    here = {k: g["seconds"].get("at_21M") for k, g in growth.items() if not k.startswith("old_") and g.get("seconds")}
    rss = {k: g["peak_rss_gb"].get("at_21M") for k, g in growth.items() if g.get("peak_rss_gb")}
    enc = [s for r in stages.get("encode", {}).values() if "shards" in r for s in r["shards"]]
    rate = sum(s["rows"] for s in enc) / sum(s["seconds"] for s in enc) if enc else None  # passages/s per process here
    if rate:
        here["encode"] = TARGET / rate  # linear in the passages: shards are independent
    gpu_rate = GPU["bf16_peak_flops"] * GPU["mfu"] / (2 * ENCODER["params"] * ENCODER["tokens_per_passage"])
    node, cluster = {}, {}
    for k, t in here.items():
        if t is None:
            continue
        if k == "encode":
            node[k], cluster[k] = TARGET / (8 * gpu_rate), TARGET / (32 * gpu_rate)
        elif k.startswith("ivfpq_build"):  # 768-dim vectors, FAISS's OpenMP over the node's cores
            node[k] = cluster[k] = t * DIM_FACTOR * (results["machine"]["cpus"] / NODE_CPUS)
        else:  # Arrow conversion, BM25 (one process, chunked), searches: as measured here (they do not spread)
            node[k] = cluster[k] = t
    return {"target_passages": TARGET, "this_machine_s": here, "this_machine_peak_rss_gb": rss,
            "one_8gpu_node_s": node, "four_8gpu_nodes_s": cluster,
            "encode_rate_here_passages_per_s": rate, "assumed_gpu_encode_rate_passages_per_s": gpu_rate,
            "assumptions": {"gpu": GPU, "encoder": ENCODER, "node_cpus": NODE_CPUS, "dim_factor": DIM_FACTOR,
                            "note": "this machine: the tiny 64-dim encoder's measured stages along their fitted growth; "
                                    "GPU and node figures are not measured: encoding e5-base at an assumed fraction of the "
                                    "GPU's bf16 peak, FAISS building for 768-dim vectors scaled by cores, the one-process "
                                    "stages (Arrow conversion, BM25, searches) as measured on this machine's cores"}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, series in results["stages"].items():
        pts = sorted((int(n), r) for n, r in series.items() if "error" not in r)
        if len(pts) < 1:
            continue
        style = "--" if key.startswith("old_") else "-"
        for ax, field in zip(axes, ("seconds", "peak_rss_gb")):
            ax.plot([n for n, _ in pts], [r[field] for _, r in pts], style, marker="o", label=key)
    axes[1].axhline(6, color="grey", lw=0.8, ls=":")
    axes[1].text(1e5, 6.3, "6 GB aim", color="grey", fontsize=8)
    for ax, title in zip(axes, ("wall time (s)", "peak RSS (GB)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("passages"), ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("rag_lab index building on this machine (dashed: the previous in-memory design)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rag_lab_scale")
    ap.add_argument("--out", type=Path, default=OUT / "scale.json")
    ap.add_argument("--timeout", type=int, default=4 * 3600)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpora and caches")
    ap.add_argument("--report", action="store_true", help="only recompute growth, extrapolation and the plot from --out")
    ap.add_argument("--stages", nargs="*", help="run only these stages (default: all)")
    ap.add_argument("--redo", action="store_true", help="measure again the stages --out already holds")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.size, args.workdir)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report:
        results = json.loads(args.out.read_text())
        finish(results, args.out)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiny_encoder(args.workdir / "tiny-encoder")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("stages", {})
    results["machine"] = {"cpus": os.cpu_count(), "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3}
    results["setup"] = {"shard_rows": SHARD_ROWS, "queries": N_QUERIES, "encoder": "random BERT, 1 layer, 64 dims, "
                        "all-MiniLM-L6-v2 tokenizer, 64 tokens, float16 shards", "ivf": "IVF(2^round(log2(4 sqrt n))),PQ16np (no polysemous training), nprobe 32"}
    results.setdefault("corpora", {})
    ours = ["baseline", "arrow", "bm25_build", "bm25_search", "encode", "ivfpq_build", "ivfpq_search"]
    for n in sorted(set(args.sizes) | set(args.old_sizes)):
        source = args.workdir / f"corpus-{n}.jsonl"
        if not source.exists() and not (args.stages and all(s == "baseline" for s in args.stages)):
            results["corpora"][str(n)] = make_corpus(n, source)
            print(f"corpus {n:,}: {results['corpora'][str(n)]}", flush=True)
        names = (ours if n in args.sizes else []) + (["old_corpus", "old_bm25", "old_dense"] if n in args.old_sizes else [])
        names = [s for s in names if (not args.stages or s in args.stages)
                 and (args.redo or "error" in results["stages"].get(s, {}).get(str(n), {"error": "none yet"}))]
        for name in names:
            r = run_stage(name, n, args.workdir, args.timeout)
            results["stages"].setdefault(name, {})[str(n)] = r
            print(f"{name:>13} {n:>10,}: {r.get('seconds', float('nan')):9.1f} s  peak RSS {r.get('peak_rss_gb', float('nan')):6.2f} GB"
                  + (f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
            _write(results, args.out)
        if not args.keep:
            shutil.rmtree(args.workdir / f"cache-{n}", ignore_errors=True)
            source.unlink(missing_ok=True)
        gc.collect()
    finish(results, args.out)


def finish(results: dict, out: Path) -> None:
    results["growth"] = {k: {f: fit(*zip(*[(int(n), r[f]) for n, r in v.items() if "error" not in r])) for f in ("seconds", "peak_rss_gb")}
                         for k, v in results["stages"].items() if sum("error" not in r for r in v.values()) >= 2}
    base = results["stages"].get("baseline", {})
    floor = min((r["peak_rss_gb"] for r in base.values() if "error" not in r), default=None)
    if floor is not None:  # growth of what a stage holds above the interpreter + imports
        results["growth_above_baseline"] = {
            k: fit(*zip(*[(int(n), max(r["peak_rss_gb"] - floor, 1e-3)) for n, r in v.items() if "error" not in r]))
            for k, v in results["stages"].items() if k != "baseline" and sum("error" not in r for r in v.values()) >= 2}
        results["baseline_rss_gb"] = floor
    results["extrapolation"] = extrapolate(results)
    _write(results, out)
    plot(results, out.with_suffix(".png"))
    print(json.dumps({k: results[k] for k in ("growth", "extrapolation")}, indent=1))


def _write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
