"""Stage 4, generate: predictions cached by content (`generation_key`), written batch by batch to a
checksummed log so a killed run resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from rag_lab.config import ExperimentConfig, key_view
from rag_lab.generators import build_generator
from rag_lab.io import (CacheRepaired, atomic_write_text, jsonl_bytes, read_checked, stable_hash, write_checked,
                        write_json)
from rag_lab.models import model_fingerprint, resolve_model
from rag_lab.paths import cache_dir
from rag_lab.pipeline import Contexts
from rag_lab.flops import checkpoint_params
from rag_lab.runner.contexts import doc_logits
from rag_lab.runner.plan import RunData


def generation_key(cfg: ExperimentConfig, model_id: str, data: RunData, ctx: Contexts | None) -> str:
    """The generation cache key: content, never names — the generation settings and prompt
    templates, the weights' fingerprint, every question (text and answers), the demonstration
    pool's questions when demonstrations are drawn, and the id, title and text of every passage."""
    def examples(qs):
        return [[q.id, q.question, list(q.answers)] for q in qs]

    return stable_hash({
        "key_format": 2,  # 1 keyed passages by id and the pool by name: an edited corpus reused old predictions
        "generator": key_view(cfg.generator), "model": model_id, "seed": cfg.seed,
        "demonstration_pool": stable_hash(examples(data.train)) if cfg.generator.n_few_shot else None,
        "questions": examples(data.questions),
        "passages": None if ctx is None else [[[p.id, p.title, p.text] for p in row] for row in ctx.passages],
        # readers that weigh passages read the retriever's scores too (absent for the others: their keys stay)
        **({"doc_logits": doc_logits(cfg, ctx)} if cfg.generator.combine in ("rag_sequence", "rag_token") else {}),
    })


def generate_stage(cfg: ExperimentConfig, data: RunData, ctx: Contexts | None, model_path: str,
                   show_progress: bool) -> tuple[list[dict], str, dict]:
    """Predictions in question order, the cache key, and what computing them took: {"generate_s"
    (None if a cache predates that record), "prompt_tokens", "new_tokens", "n_params", "precision"}
    for timings.csv. Finished batches are appended to `partial.jsonl` as they complete, so a killed
    run restarts where it stopped; the batch plan is deterministic."""
    path = resolve_model(model_path)  # once: the fingerprint, the loader and the parameter count all read it
    key = generation_key(cfg, model_fingerprint(path), data, ctx)
    stage = cache_dir("runs") / f"generate-{key[:20]}"
    done_path, partial_path, timing_path = stage / "predictions.jsonl", stage / "partial.jsonl", stage / "timing.json"
    cached = read_checked(done_path)  # checksum-verified; a damaged file is reported, deleted and regenerated
    if cached is not None and len(rows := [json.loads(x) for x in cached.decode("utf-8").splitlines() if x.strip()]) == len(data.questions):
        return rows, key, _stage_cost(timing_path)
    generator = build_generator(cfg.generator, data.train, seed=cfg.seed, model_path=path)
    # seconds of generation, summed over resumed sessions (loading the model is not counted)
    preds, seconds = _generate_resumable(generator, data.questions, None if ctx is None else ctx.passages,
                                         partial_path, show_progress, doc_logits(cfg, ctx), key=key)
    cost = {"generate_s": None if seconds is None else round(seconds, 2), **generation_cost(generator, preds, path)}
    write_json(timing_path, cost)
    write_checked(done_path, jsonl_bytes(preds))
    partial_path.unlink(missing_ok=True)
    return preds, key, cost


def _stage_cost(timing_path: Path) -> dict:
    """What computing a cached stage took (timing.json); unreadable or absent: unknown, saying so when damaged."""
    if not timing_path.exists():
        return {"generate_s": None}
    try:
        cost = json.loads(timing_path.read_text(encoding="utf-8"))
        if isinstance(cost, dict):
            return cost
    except (ValueError, UnicodeDecodeError):
        pass
    warnings.warn(f"{timing_path}: unreadable; the row's compute seconds are unknown (the predictions are checked "
                  "and kept)", CacheRepaired, stacklevel=2)
    return {"generate_s": None}


def generation_cost(generator, preds: list[dict], model_path: Path | str) -> dict:
    """Tokens read and written, the model's parameters and the precision it ran in (timings.csv);
    empty for a generator that counts no tokens (the extractive reader reads, it writes none).
    `model_path` is resolved already (a hub id stays a string: no local checkpoint to count)."""
    counts = generator.token_counts(preds)
    if not counts:
        return {}
    path = Path(model_path)
    return {**counts, "n_params": checkpoint_params(path) if path.is_dir() else None, "precision": generator.precision}


def _batch_sha256(key: str, indices: list[int], raws: list, seconds: float | None) -> str:
    return hashlib.sha256((key + json.dumps({"indices": indices, "raw": raws, "s": seconds}, sort_keys=True,
                                            ensure_ascii=False)).encode("utf-8")).hexdigest()


def _batch_line(key: str, indices: list[int], raws: list, seconds: float | None) -> str:
    """One batch-log line: the batch and a sha256 over it and the generation key, so a line edited by
    hand, cut off by a kill or copied from another run's log is never taken for a finished batch."""
    return json.dumps({"indices": indices, "raw": raws, "s": seconds, "sha256": _batch_sha256(key, indices, raws, seconds)},
                      ensure_ascii=False) + "\n"


def read_batch_log(path: Path, key: str) -> list[dict]:
    """The batches of a log whose checksum holds; a damaged log is rewritten with those alone, saying so
    (its other batches are generated again). A line cut off at the end (a kill mid-write) is dropped quietly."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    good, bad = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and row["sha256"] == _batch_sha256(key, row["indices"], row["raw"], row.get("s")) \
                and line.endswith("\n")
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            good.append((line, row))
        elif line.strip() and not (i == len(lines) - 1 and not line.endswith("\n")):
            bad.append(i + 1)
    if bad or len(good) != len(lines):
        if bad:
            warnings.warn(f"{path}: batch log lines {bad[:5]}{' ...' if len(bad) > 5 else ''} fail their checksum: "
                          "dropped, those batches are generated again", CacheRepaired, stacklevel=2)
        atomic_write_text(path, "".join(line for line, _ in good))
    return [row for _, row in good]


def _generate_resumable(generator, questions, contexts, partial_path: Path, show_progress: bool,
                        logits: list[list[float]] | None = None, key: str = "") -> tuple[list[dict], float | None]:
    """`generator.generate`, logging each finished batch (with its seconds and a checksum bound to the
    generation `key`) to `partial_path` and skipping those already logged. Returns the predictions and
    the seconds all batches took, over every resumed session (None if an old log lacks them)."""
    done: dict[int, object] = {}
    seconds: list[float | None] = []
    if partial_path.exists():  # resume: keep every batch that was fully written and checks out
        for row in read_batch_log(partial_path, key):
            done.update(zip(row["indices"], row["raw"]))
            seconds.append(row.get("s"))
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    last = time.perf_counter()
    with open(partial_path, "a", encoding="utf-8") as log:
        def on_batch(indices: list[int], raws: list) -> None:
            nonlocal last
            now = time.perf_counter()
            seconds.append(round(now - last, 3))
            log.write(_batch_line(key, indices, raws, seconds[-1]))
            log.flush()
            os.fsync(log.fileno())
            last = now

        preds = generator.generate(questions, contexts, show_progress=show_progress, done=done, on_batch=on_batch, doc_logits=logits)
    return preds, None if None in seconds else sum(seconds)
