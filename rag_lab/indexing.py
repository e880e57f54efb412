"""`rag-lab index EXPERIMENT.yaml`: build an experiment's retrieval index ahead of its run.

    rag-lab index experiments/X.yaml                  # everything, in this process (a laptop; resumes)
    rag-lab index experiments/X.yaml --shard 3/8      # dense: encode one shard (one GPU or machine each)
    rag-lab index experiments/X.yaml                  # ... then, once every shard is there: the index
    rag-lab index experiments/X.yaml --ray --workers 8 --gpus-per-worker 1   # the shards on a Ray cluster

The corpus is the run's (`data_stage`: the same subset and windows), converted once to Arrow; BM25 is
built chunk by chunk in one process; dense embeddings are written shard by shard, and a shard
count never changes them (whole encoder chunks), so the run afterwards finds everything in the
cache under the same content keys and builds nothing.
"""
from __future__ import annotations

import re
import time

from rag_lab.config import REGIMES, ConfigError, ExperimentConfig
from rag_lab.data.subsets import corpus_label
from rag_lab.pipeline import build_index
from rag_lab.retrievers import dense_encoder
from rag_lab.retrievers.cache import retriever_cache_dir
from rag_lab.runner import data_stage
from rag_lab.scale import ray_encode

DENSE_KINDS = ("dense", "hybrid")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: write i/n with 0 <= i < n (shards are numbered from 0), e.g. --shard 0/4")
    return int(m[1]), int(m[2])


def index_experiment(cfg: ExperimentConfig, shard: tuple[int, int] | None = None, ray_workers: int = 0,
                     n_shards: int | None = None, gpus_per_worker: float = 0.0, address: str | None = None,
                     profile: str = "default", show_progress: bool = True) -> list[str]:
    """Build (or finish) the index `cfg`'s run will search; returns report lines."""
    kind = cfg.retriever.kind
    if kind == "none" or not REGIMES[cfg.regime].retrieves:
        raise ConfigError(f"{cfg.name}: regime {cfg.regime!r} with retriever.kind {kind!r} retrieves nothing: no index to build")
    if (shard or ray_workers) and kind not in DENSE_KINDS:
        raise ConfigError(f"--shard and --ray split dense encoding; retriever.kind {kind!r} builds in one process "
                          "(BM25 is built chunk by chunk, in bounded memory): run `rag-lab index` without them")
    t0 = time.perf_counter()
    corpus = data_stage(cfg).passages
    lines = [f"corpus: {len(corpus):,} passages ({corpus.source})"]
    if shard is not None:
        encoder = dense_encoder(cfg.retriever, corpus, show_progress=show_progress)
        path = encoder.encode_shard(*shard)
        left = sum(b - a for a, b in encoder.store.missing())
        done = f"{path}" if path else f"no rows (the corpus is {-(-len(corpus) // encoder.store.chunk)} encoder chunk(s))"
        return lines + [f"shard {shard[0]}/{shard[1]}: {done} ({time.perf_counter() - t0:.0f} s)",
                        f"{left:,} rows still to encode in other shards" if left else
                        "every shard is encoded: run `rag-lab index` without --shard to build the index"]
    if ray_workers:
        for r in ray_encode(cfg.retriever, corpus, retriever_cache_dir(), ray_workers, n_shards, gpus_per_worker,
                            address=address):
            lines.append(f"ray shard {r['shard']}: {r['rows']} in {r['seconds']:.1f} s on {r['host']}")
    retriever = build_index(cfg.retriever, corpus, show_progress=show_progress, corpus_label=corpus_label(cfg.data),
                            profile=profile)
    parts = getattr(retriever, "parts", None) or (retriever,)
    for part in parts:
        hit = getattr(part, "cache_hit", None)
        lines.append(f"{type(part).__name__}: {'loaded from the cache' if hit in (True, {'embeddings': True, 'index': True}) else 'built'}"
                     + (f" ({part.build['seconds']:.0f} s)" if getattr(part, "build", None) else ""))
    return lines + [f"done in {time.perf_counter() - t0:.0f} s"]
