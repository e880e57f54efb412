"""Past one machine, on Ray Data: corpus encoding and batch generation spread over workers.

    pip install -e ".[scale]"                       # ray[data]; the default install stays small
    ray start --head                                 # on the head node; `ray start --address HEAD:6379` on the others
    rag-lab index experiments/full/rag_zero_shot_e5.yaml --profile full --ray --workers 32 --gpus-per-worker 1

Encoding (`ray_encode`): a Ray Dataset with one row per shard of the corpus; `map_batches` runs a
pool of `ShardEncoder` actors (one per GPU, or per CPU worker), each loading the encoder once and
writing its shards with `DenseRetriever.encode_shard`: the same chunks, files and bytes as
`rag-lab index --shard i/n` or one process (tested on a local 2-worker Ray against the in-process
embeddings). Workers read passages by row from the memory-mapped Arrow corpus (on a cluster: the
converted folder on shared storage, `RAG_LAB_CACHE`); they write shards into the retrieval cache,
and the index is then built from them by the driver.

Generation (`ray_generate`): contiguous shards of the questions, one generator per worker
(`build_generator`, any backend: vLLM with one engine per GPU group is vLLM's own recipe for
offline data parallelism); the records come back in question order, the same as one generator's.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import UserError

INSTALL = 'the Ray path needs ray[data]: pip install -e ".[scale]" (or pip install "ray[data]>=2.9")'


class ScaleError(UserError, RuntimeError):
    """A missing engine or a bad worker setting; the message says how to fix it."""


def require_ray():
    if importlib.util.find_spec("ray") is None:
        raise ScaleError(INSTALL)
    return importlib.import_module("ray")


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster at `address` (or `$RAY_ADDRESS`); with neither, start a local Ray
    with `num_cpus` workers. Already connected: nothing to do."""
    ray = require_ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to Ray's servers unless the user opts in
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def _corpus_spec(corpus: Corpus) -> dict:
    """How a worker opens the corpus: the converted folder (shared storage), else the table itself."""
    if corpus.folder is not None:
        return {"folder": str(corpus.folder)}
    return {"table": corpus.table, "fingerprint": corpus.fingerprint, "source": corpus.source}


def _open_corpus(spec: dict) -> Corpus:
    if "folder" in spec:
        return Corpus.open(spec["folder"])
    return Corpus(spec["table"], spec["fingerprint"], spec["source"])


class ShardEncoder:
    """A Ray Data actor: loads the dense encoder once, then encodes the shards it is handed."""

    def __init__(self, retriever_cfg, corpus: dict, n_shards: int, cache_dir: str, chunk: int):
        from rag_lab.retrievers import dense_encoder  # why: the actor process loads the encoder (torch) itself

        self.n_shards = n_shards
        self.retriever = dense_encoder(retriever_cfg, _open_corpus(corpus), Path(cache_dir), show_progress=False, chunk=chunk)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds = [], []
        for shard in batch["shard"].tolist():
            t0 = time.perf_counter()
            path = self.retriever.encode_shard(int(shard), self.n_shards)
            rows.append(path.name if path else "no rows")
            seconds.append(time.perf_counter() - t0)
        return {"shard": batch["shard"], "rows": np.array(rows), "seconds": np.array(seconds),
                "host": np.array([socket.gethostname()] * len(rows))}


def ray_encode(retriever_cfg, corpus: Sequence[Passage] | Corpus, cache_dir: Path, workers: int, n_shards: int | None = None,
               gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, chunk: int | None = None,
               address: str | None = None) -> list[dict]:
    """Encode every shard of the corpus embeddings of `retriever_cfg` on a pool of `workers` Ray actors;
    returns one record per shard (its rows, seconds, host). Complete shards are skipped by the
    workers, so a rerun after a lost node resumes."""
    from rag_lab.retrievers.dense import ENCODE_CHUNK  # why: keeps `import rag_lab.scale` free of torch

    if workers < 1 or (n_shards is not None and n_shards < 1):
        raise ScaleError(f"ray_encode needs workers >= 1 and n_shards >= 1 (got workers={workers}, n_shards={n_shards})")
    ray = start_ray(address, num_cpus=max(1, int(workers * cpus_per_worker)))
    corpus = as_corpus(corpus)
    n_shards = n_shards or workers
    ds = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
    out = ds.map_batches(ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, n_shards)),
                         fn_constructor_kwargs={"retriever_cfg": retriever_cfg, "corpus": _corpus_spec(corpus),
                                                "n_shards": n_shards, "cache_dir": str(cache_dir),
                                                "chunk": chunk or ENCODE_CHUNK},
                         num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker)
    return sorted(({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in out.take_all()),
                  key=lambda r: r["shard"])


class ShardGenerator:
    """A Ray Data actor: builds one generator (any backend) and answers the question shards it is handed."""

    def __init__(self, generator_cfg, questions, contexts, n_shards: int, model_path: str | None, train, seed: int):
        from rag_lab.generators import build_generator  # why: the actor process loads the reader itself

        self.questions, self.contexts, self.n_shards = questions, contexts, n_shards
        self.generator = build_generator(generator_cfg, train, seed, model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for shard in batch["shard"].tolist():
            a, b = _bounds(len(self.questions), int(shard), self.n_shards)
            ctx = None if self.contexts is None else self.contexts[a:b]
            records.append(json.dumps(self.generator.generate(self.questions[a:b], ctx)))
        return {"shard": batch["shard"], "records": np.array(records)}


def _bounds(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    return shard * n // n_shards, (shard + 1) * n // n_shards


def ray_generate(generator_cfg, questions: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None, workers: int,
                 n_shards: int | None = None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 model_path: str | None = None, train: Sequence[QAExample] = (), seed: int = 0,
                 address: str | None = None) -> list[dict]:
    """`build_generator(generator_cfg, train, seed, model_path).generate(questions, contexts)`, spread over
    `workers` Ray actors (`gpus_per_worker` = the engine's tensor-parallel size on a GPU node); the
    records come back in question order."""
    if workers < 1:
        raise ScaleError(f"ray_generate needs workers >= 1, got {workers}")
    if contexts is not None and len(contexts) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    ray = start_ray(address, num_cpus=max(1, int(workers * cpus_per_worker)))
    n_shards = min(n_shards or workers, len(questions)) or 1
    ds = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
    out = ds.map_batches(ShardGenerator, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, n_shards)),
                         fn_constructor_kwargs={"generator_cfg": generator_cfg, "questions": list(questions),
                                                "contexts": None if contexts is None else [list(c) for c in contexts],
                                                "n_shards": n_shards, "model_path": model_path, "train": list(train),
                                                "seed": seed},
                         num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker)
    by_shard = {int(r["shard"]): json.loads(r["records"]) for r in out.take_all()}
    return [rec for shard in range(n_shards) for rec in by_shard[shard]]
