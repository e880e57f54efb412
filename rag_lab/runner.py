"""`run_experiment(cfg)`: the one orchestrator. Every experiment runs the same stages, in order,

    data -> contexts -> train (fine-tuned regimes, once per seed) -> generate -> score -> record

and `STAGES` (from `config.REGIMES`) says which of them a regime runs and which trainer it uses. The stages call the
primitives (`pipeline.contexts`, the trainers of `rag_lab.training`, the generators); none of those
sees the experiment config.

Each run leaves `results/runs/<experiment>/<run id>/` (config, predictions, metrics, timings,
versions) and upserts one row of `results/main_table.{csv,md}`. Profiles other than
`default` write under `results/<profile>/` so they never overwrite the committed tables.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from accelerate import PartialState

from rag_lab.config import REGIMES, ConfigError, ExperimentConfig, RetrieverConfig, key_view
from rag_lab.data import DATASETS, Corpus, load_qa
from rag_lab.data.records import Passage, QAExample
from rag_lab.data.subsets import corpus_for, corpus_label, eval_set_name, subset_questions
from rag_lab.generators import build_generator
from rag_lab.io import (CacheRepaired, DataError, atomic_write_text, check_replaceable, clean_orphans, jsonl_bytes, read_checked,
                        stable_hash, write_checked, write_json)
from rag_lab.metrics import AnswerInPassage, bootstrap_ci, normalize_answer, score_predictions
from rag_lab.models import ModelNotFoundError, model_fingerprint, resolve_model
from rag_lab.paths import REPO_ROOT, cache_dir, profile_results_dir
from rag_lab.pipeline import Contexts, contexts, dense_index
from rag_lab.results import table_row, upsert_main_table
from rag_lab.runs import repair_main_table, write_run_folder
from rag_lab.flops import checkpoint_params, decoder_flops, training_flops
from rag_lab.timings import StageTiming, record
from rag_lab.training import (FINAL, QUERY_ENCODER, PassageIndex, Split, TrainSettings, finished, split_train_dev,
                              train_fid, train_generator, train_joint, train_reader)
from rag_lab.training.common import RUNTIME_ONLY

@dataclass
class RunResult:
    run_dir: Path
    row: dict
    predictions: list[dict]
    metrics: dict
    timings: dict
    training: dict  # seed -> training report (fine-tuned regimes), else empty


@dataclass(frozen=True)
class RunData:
    questions: list[QAExample]  # the eval questions, in file order
    train: list[QAExample]  # the train split (fine-tuning, few-shot demonstrations), else empty
    passages: Corpus | list  # the corpus the retriever searches (regimes with contexts, memory-mapped Arrow), else empty
    leak_check: dict = dataclasses.field(default_factory=dict)  # leak_guard's record, written to the run folder


# ---------------------------------------------------------------- which stages a regime runs

GENERATOR_TRAINERS = {"fid": train_fid}  # generator.combine -> its trainer; every other reader: train_generator


def _train_decoder(cfg: ExperimentConfig, examples, ctx, settings: TrainSettings, out: Path, record: dict) -> dict:
    trainer = GENERATOR_TRAINERS.get(cfg.generator.combine, train_generator)
    return trainer(examples, ctx, settings, cfg.generator, out, record)


def _train_joint(cfg: ExperimentConfig, examples, index: PassageIndex, settings: TrainSettings, out: Path, record: dict) -> dict:
    return train_joint(examples, index, settings, cfg.generator, cfg.retriever.k, cfg.retriever.temperature, out, record,
                       refresh_cache=cache_dir("retrieval") / "refresh")


def _train_span_reader(cfg: ExperimentConfig, examples, ctx, settings: TrainSettings, out: Path, record: dict) -> dict:
    return train_reader(examples, ctx, settings, cfg.generator.model, out, record)


@dataclass(frozen=True)
class Stages:
    contexts: bool  # retrieve passages for every question (and for the training questions)
    train: Callable | None = None  # the trainer of a fine-tuned regime: (cfg, examples, contexts, settings, out, record) -> info
    # the trainer searches the dense index itself with a query encoder it trains (it gets a PassageIndex, not
    # contexts), and the eval questions are retrieved again with the trained query encoder
    trains_query_encoder: bool = False


# how each regime that trains (config.REGIMES: what every regime is) trains
TRAINERS: dict[str, Callable] = {"closed_book_ft": _train_decoder, "rag_ft": _train_decoder, "rag_e2e_ft": _train_joint,
                                 "reader": _train_span_reader}
STAGES: dict[str, Stages] = {name: Stages(contexts=r.retrieves, train=TRAINERS[name] if r.trains else None,
                                          trains_query_encoder=r.end_to_end) for name, r in REGIMES.items()}


# ---------------------------------------------------------------- stage 1: data

def check_models(cfg: ExperimentConfig, model_path: str | None = None) -> None:
    """Resolve every model the run will load (ModelNotFoundError names the key and the fix)."""
    for key, name in (("generator.model", model_path or cfg.generator.model),
                      ("retriever.encoder", cfg.retriever.encoder if cfg.retriever.kind in ("dense", "hybrid") else None)):
        if name is not None:
            try:
                resolved = resolve_model(name)
            except ModelNotFoundError as e:
                raise ModelNotFoundError(f"{key}: {e}") from None
            if isinstance(resolved, Path) and resolved.is_dir():
                _check_model_folder(key, resolved, cfg.generator.kind if key == "generator.model" else None)


def _check_model_folder(key: str, folder: Path, kind: str | None) -> None:
    """A local model folder holds a model (config.json) of the kind the config reads it as: an error naming the
    key now, not a traceback from transformers after retrieval."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{key}: {folder} is a folder but not a model (no config.json); name a saved "
                                 "checkpoint folder, an embedded model or a hub id")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(f"{key}: {config_file} is not readable JSON ({e})") from None
    encoder_decoder = bool(config.get("is_encoder_decoder")) if isinstance(config, dict) else False
    if kind == "seq2seq" and not encoder_decoder:
        raise ConfigError(f"generator.kind: seq2seq, but {folder} is not an encoder-decoder model "
                          f"({config.get('model_type', '?')}): use generator.kind: decoder")
    if kind == "decoder" and encoder_decoder:
        raise ConfigError(f"generator.kind: decoder, but {folder} is an encoder-decoder model "
                          f"({config.get('model_type', '?')}): use generator.kind: seq2seq")


def data_stage(cfg: ExperimentConfig) -> RunData:
    """The eval questions, the train split when something needs it, and the corpus when retrieving."""
    d, stages = cfg.data, STAGES[cfg.regime]
    questions = subset_questions(load_qa(d.dataset, d.eval_split), d.n_eval, d.subset_seed)
    if d.only_answer_in_corpus:  # the oracle row's lens: the questions a perfect retriever could serve
        if any(q.answer_in_corpus is None for q in questions):
            raise ConfigError(f"data.only_answer_in_corpus: the questions of {d.dataset!r} carry no answer_in_corpus flag "
                              "(nq-mini has it; rag_lab.data.build_nq_mini.mark_answer_in_corpus adds it)")
        questions = [q for q in questions if q.answer_in_corpus]
    if d.only_gold_passage:  # the gold-passage oracle's lens: the questions an annotator found a passage for
        if not any(q.gold_passage_id for q in questions):
            raise ConfigError(f"data.only_gold_passage: no question of {d.dataset!r} / {d.eval_split} carries a "
                              "gold_passage_id (nq-mini's NQ-open splits have them)")
        questions = [q for q in questions if q.gold_passage_id]
    if cfg.retriever.kind == "gold" and not d.only_gold_passage:
        raise ConfigError("retriever.kind: gold hands each question its annotated passage, and questions without one "
                          "would be read closed-book: set data.only_gold_passage: true")
    needs_train = cfg.generator.n_few_shot > 0 or stages.train is not None
    train, leak_check = leak_guard(cfg, questions, load_qa(d.dataset, d.train_split) if needs_train else [])
    if cfg.generator.n_few_shot > len(train):
        raise ConfigError(f"generator.n_few_shot = {cfg.generator.n_few_shot} but the train split ({d.dataset} / "
                          f"{d.train_split}) holds {len(train)} questions")
    passages = corpus_for(d, questions) if stages.contexts else []
    return RunData(questions, train, passages, leak_check)


_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u201c": '"',
                              "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u2013": "-", "\u2014": "-", "\u2212": "-"})


def question_key(question: str) -> str:
    """A question's text as the leak guard compares it: Unicode NFKC, typographic quotes and dashes as ASCII
    (’ and ' are the same question), then the SQuAD normalisation."""
    return normalize_answer(unicodedata.normalize("NFKC", question).translate(_TYPOGRAPHIC))


def leak_guard(cfg: ExperimentConfig, questions: list[QAExample], train: list[QAExample]) -> tuple[list[QAExample], dict]:
    """The train pool (demonstrations and training questions are drawn from it) made disjoint from
    the eval questions, and the record of the check (written to the run folder as leak_check.json).

    A question is shared when its id or its normalised text is. For a file dataset a shared question
    is an error that counts them; a registered benchmark keeps its published splits, whose few
    shared questions (NQ-open's train and dev share some) are held out of the pool and listed."""
    eval_ids, eval_texts = {q.id for q in questions}, {question_key(q.question) for q in questions}
    shared = [q for q in train if q.id in eval_ids or question_key(q.question) in eval_texts]
    if shared and cfg.data.dataset not in DATASETS:
        raise DataError(f"data.train_split {cfg.data.train_split} and data.dataset {cfg.data.dataset} share {len(shared)} "
                        f"question(s) (same id or same normalised text), e.g. {shared[0].id!r}: {shared[0].question!r}; "
                        "remove them from one file")
    kept = [q for q in train if q not in shared] if shared else train
    return kept, {"eval_questions": len(questions), "train_pool": len(train), "train_pool_used": len(kept),
                  "held_out_shared": [q.id for q in shared], "disjoint": True,
                  "rule": "no train-pool question shares an id or normalised text with an eval question"}


# ---------------------------------------------------------------- stage 2: contexts

def portable_path(path: Path) -> str:
    """A path as a committed file should name it: relative to the repository when under it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def check_k(cfg: ExperimentConfig, passages) -> None:
    """retriever.k no larger than the corpus it searches (FAISS pads with -1, bm25s refuses: say it first)."""
    if cfg.retriever.k > len(passages):
        raise ConfigError(f"retriever.k = {cfg.retriever.k} is larger than the corpus ({len(passages)} passages, "
                          f"{corpus_label(cfg.data)}): lower retriever.k or raise data.n_corpus")


def contexts_stage(cfg: ExperimentConfig, data: RunData, show_progress: bool, profile: str = "default") -> Contexts | None:
    """The top-k passages of every eval question (None for closed-book regimes)."""
    if not STAGES[cfg.regime].contexts:
        return None
    check_k(cfg, data.passages)
    (ctx,) = contexts(cfg.retriever, data.passages, cfg.retriever.k, data.questions, show_progress=show_progress,
                      corpus_label=corpus_label(cfg.data), profile=profile)
    return ctx


# ---------------------------------------------------------------- stage 3: train (fine-tuned regimes)

def training_record(cfg: ExperimentConfig, seed: int) -> dict:
    """Everything that changes the trained weights (the checkpoint folder's identity)."""
    retriever = key_view(cfg.retriever) if cfg.retriever.kind != "none" else None
    training = {k: v for k, v in key_view(cfg.training).items() if k not in RUNTIME_ONLY}
    return {"base_model": cfg.generator.model, "generator": key_view(cfg.generator), "retriever": retriever,
            "data": key_view(cfg.data), "training": {**training, "seeds": None},
            "seed": seed, "regime": cfg.regime}


def training_dir(cfg: ExperimentConfig, seed: int) -> Path:
    """`training.output`/seed<N> when set, else cache/train/<experiment>-<hash of the training record>."""
    if cfg.training.output:
        return Path(cfg.training.output) / f"seed{seed}"
    return cache_dir("train") / f"{cfg.name}-{stable_hash(training_record(cfg, seed))[:12]}"


def train_stage(cfg: ExperimentConfig, data: RunData, seed: int, show_progress: bool, profile: str = "default") -> tuple[Path, dict]:
    """The fine-tuned model folder for (cfg, seed) and its training info: reused when a finished
    one was made with the same training record, else trained on the train split less a seeded dev
    slice, with the passages the configured retriever finds for those questions."""
    out, record = training_dir(cfg, seed), training_record(cfg, seed)
    info = finished(out, record)
    if info is None:
        check_replaceable(out / FINAL, "training.output")  # before training, not at the rename that saves
        stages = STAGES[cfg.regime]
        examples = split_train_dev(data.train, cfg.training.dev_size, cfg.data.n_train, seed)
        ctx = None
        if stages.contexts:  # the corpus keeps the training questions' answers (smoke profiles cut it)
            passages = corpus_for(cfg.data, examples.train + examples.dev)
            check_k(cfg, passages)
            label = corpus_label(cfg.data) + (" (kept for the training questions)" if cfg.data.n_corpus else "")
            if stages.trains_query_encoder:
                ctx = passage_index(cfg.retriever, passages, show_progress)
            else:
                train_ctx, dev_ctx = contexts(cfg.retriever, passages, cfg.retriever.k, examples.train, examples.dev,
                                              show_progress=show_progress, corpus_label=label, profile=profile)
                ctx = Split(train_ctx.passages, dev_ctx.passages)
        settings = TrainSettings.from_config(cfg.training, seed=seed, max_new_tokens=cfg.generator.max_new_tokens)
        info = stages.train(cfg, examples, ctx, settings, out, record)
    return out / FINAL, info


def passage_index(retriever_cfg: RetrieverConfig, passages: Sequence[Passage], show_progress: bool = True) -> PassageIndex:
    """What an end-to-end trainer searches: the fixed passage embeddings and index of the dense
    retriever `retriever_cfg` describes (cached as for evaluation) and the encoder its query side starts from."""
    dense = dense_index(retriever_cfg, passages, show_progress=show_progress)
    return PassageIndex(dense.passages, dense.embeddings, dense.index, retriever_cfg.query_encoder or retriever_cfg.encoder,
                        retriever_cfg.query_prefix, retriever_cfg.passage_prefix, retriever_cfg.max_length)


def trained_query_contexts(cfg: ExperimentConfig, data: RunData, final: Path, show_progress: bool, profile: str) -> Contexts:
    """The eval questions' top-k with the query encoder trained end to end (`final/query_encoder`) over
    the same fixed passage embeddings."""
    retriever = dataclasses.replace(cfg.retriever, query_encoder=str(final / QUERY_ENCODER))
    (ctx,) = contexts(retriever, data.passages, cfg.retriever.k, data.questions, show_progress=show_progress,
                      corpus_label=corpus_label(cfg.data), profile=profile)
    return ctx


def doc_logits(cfg: ExperimentConfig, ctx: Contexts | None) -> list[list[float]] | None:
    """log p_eta(z|x) up to a constant: each hit's score / `retriever.temperature` (readers that weigh passages)."""
    return None if ctx is None else [[h.score / cfg.retriever.temperature for h in row] for row in ctx.hits]


# ---------------------------------------------------------------- stage 4: generate (resumable)

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


# ---------------------------------------------------------------- stage 5: score

PREDICTION_EXTRAS = ("prompt_tokens", "truncated", "prompt_sha256")  # copied from the generator's record when it has them


def score_stage(questions: Sequence[QAExample], preds: list[dict], ctx: Contexts | None) -> list[dict]:
    """The prediction rows of the data contract, one per question. What the reader saw is what counts:
    `passage_ids` and `answer_in_passages` cover the passages packed into the prompt (the first
    `n_passages` of the top k: the context budget cuts the rest), `retrieved_ids` and
    `answer_in_retrieved` all k the retriever returned (its recall@k)."""
    scores = score_predictions([p["prediction"] for p in preds], [q.answers for q in questions])
    holds = AnswerInPassage()
    rows = []
    for i, (q, p) in enumerate(zip(questions, preds)):
        row = {"id": q.id, "question": q.question, "answers": list(q.answers), "prediction": p["prediction"],
               "raw": p["raw"], "passage_ids": [], "em": float(scores["em"][i]), "f1": float(scores["f1"][i]),
               "match": float(scores["match"][i]), "answer_in_passages": None, "answer_in_corpus": q.answer_in_corpus}
        if ctx is not None:
            packed = packed_count(p, len(ctx.passages[i]))
            row["passage_ids"] = [h.passage_id for h in ctx.hits[i][:packed]]
            row["answer_in_passages"] = holds.any(q.answers, ctx.passages[i][:packed])
            row["retrieved_ids"] = [h.passage_id for h in ctx.hits[i]]
            row["answer_in_retrieved"] = holds.any(q.answers, ctx.passages[i])
        rows.append({**row, **{k: p[k] for k in PREDICTION_EXTRAS if k in p}})
    return rows


def packed_count(pred: dict, n_retrieved: int) -> int:
    """How many of a question's retrieved passages its reader read: the prompt's `n_passages` (a passage
    cut to fit counts: part of it is in the prompt); readers that read every passage (the extractive
    reader, the readers of fusion.py) read all of them."""
    n = pred.get("n_passages")
    if n is None:
        return n_retrieved
    if not 0 <= n <= n_retrieved:
        raise DataError(f"prediction {pred.get('id')!r} says it read {n} passages of the {n_retrieved} retrieved")
    return int(n)


def summarize_rows(rows: list[dict], seed: int = 0) -> dict:
    """Means with 95% bootstrap CIs, for all questions and the answer-in-corpus subset."""
    out = {}
    subsets = {"all": rows, "in_corpus": [r for r in rows if r["answer_in_corpus"]]}
    for name, subset in subsets.items():
        if not subset:
            continue
        block = {"n": len(subset)}
        metrics = ["em", "f1", "match"] + (["answer_in_passages", "answer_in_retrieved"]
                                           if subset[0]["answer_in_passages"] is not None else [])
        for m in metrics:
            mean, low, high = bootstrap_ci(np.array([float(r[m]) for r in subset]), seed=seed)
            block[m] = {"mean": mean, "low": low, "high": high}
        out[name] = block
    out["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    return out


# ---------------------------------------------------------------- the run


def run_experiment(cfg: ExperimentConfig, profile: str = "default", show_progress: bool = True,
                   model_path: str | None = None) -> RunResult | None:
    """Run (or reload from the stage caches) one experiment and record it in the main table.

    Fine-tuned regimes train one model per seed in `training.seeds` (or reuse finished ones);
    the row reports the first seed's predictions with bootstrap CIs, and mean ± sd over seeds.
    Launched as several processes (`accelerate launch`, `torchrun`), every process trains and
    only the main one evaluates and returns the result (the others return None).
    """
    t0 = time.perf_counter()
    # what killed runs left half-written: run folders, generation stages, indexes and embeddings, checkpoints, corpora
    for root in (profile_results_dir(profile), *(cache_dir(kind) for kind in ("runs", "retrieval", "train", "corpus"))):
        clean_orphans(root)
    timings, compute = {}, {}  # this run's seconds; the seconds each stage took when it was computed
    stages = STAGES[cfg.regime]
    check_models(cfg, model_path)  # an unknown name fails now, not after minutes of retrieval
    # Under `accelerate launch` (several processes): rank 0 builds the corpus, index and retrieval
    # caches first and the others load them; every rank trains (DDP); rank 0 alone evaluates and records.
    state = PartialState()
    with state.main_process_first():
        data = data_stage(cfg)
        timings["data_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        ctx = contexts_stage(cfg, data, show_progress, profile)
        timings["retrieve_s"] = time.perf_counter() - t

    seeds = cfg.training.seeds if stages.train else [cfg.seed]
    per_seed, training, costs, finals = [], {}, {}, {}
    for seed in seeds if stages.train else []:  # every seed's model first: all ranks take part in training
        t = time.perf_counter()
        final, info = train_stage(cfg, data, seed, show_progress, profile)
        finals[seed] = final
        timings[f"train_seed{seed}_s"] = time.perf_counter() - t
        compute[f"train_seed{seed}_s"] = info.get("train_seconds")
        training[seed] = {"model": portable_path(final),
                          **{k: info.get(k) for k in ("n_train", "n_dev", "skipped_empty_answers", "train_loss", "global_step", "train_seconds", "train_tokens", "peak_rss_gb",
                                                       "best_checkpoint", "checkpoint_rule", "log_history", "dev_history", "objective", "passage_entropy")
                             if k in info}}
        if training[seed].get("best_checkpoint"):  # the run folder is committed: no path of the machine that built it
            training[seed]["best_checkpoint"] = portable_path(Path(training[seed]["best_checkpoint"]))
    if not state.is_main_process:
        return None  # another rank of a multi-process launch: rank 0 evaluates and writes the row
    for seed in seeds:
        path = str(finals[seed]) if stages.train else model_path or cfg.generator.model
        final = finals.get(seed)
        seed_ctx = ctx
        if stages.trains_query_encoder:  # the eval questions retrieved again, with the query encoder this seed trained
            t = time.perf_counter()
            seed_ctx = trained_query_contexts(cfg, data, final, show_progress, profile)
            timings[f"retrieve_seed{seed}_s"] = compute[f"retrieve_seed{seed}_s"] = time.perf_counter() - t
        t, stage = time.perf_counter(), f"generate_seed{seed}_s" if stages.train else "generate_s"
        preds, key, cost = generate_stage(cfg, data, seed_ctx, path, show_progress)
        compute[stage], costs[seed] = cost["generate_s"], cost
        timings[stage] = time.perf_counter() - t
        rows = score_stage(data.questions, preds, seed_ctx)
        per_seed.append((seed, key, rows, summarize_rows(rows, seed=0)))

    _, key, rows, metrics = per_seed[0]
    metrics["seeds"] = seed_summary(per_seed)
    timings["wall_s"] = time.perf_counter() - t0
    # the row's cost is that of computing it, not of a rerun served from the caches
    compute_s = None if None in compute.values() else timings["data_s"] + timings["retrieve_s"] + sum(compute.values())
    run_dir = write_run_folder(cfg, profile, key, rows, metrics, {**timings, "compute_s": compute_s}, training,
                               data.leak_check)
    repair_main_table(profile, pending=run_dir)  # this run's folder gets its row just below: not a problem
    row = table_row(cfg, metrics, eval_set_name(cfg.data, len(data.questions)), compute_s,
                    run_dir.relative_to(profile_results_dir(profile)).as_posix())
    upsert_main_table([row], profile)
    record_row_timing(cfg, compute_s, costs, training, len(data.questions), profile)
    return RunResult(run_dir, row, rows, metrics, timings, training)


def record_row_timing(cfg, compute_s: float | None, costs: dict, training: dict, n: int, profile: str) -> None:
    """The row's line of timings.csv: what computing it took, against the FLOPs it did (generation
    at 2 N per token read or written, training at 6 N per token trained)."""
    if compute_s is None:
        return
    flops, precision = 0.0, "float32"
    for seed, cost in costs.items():
        if cost.get("n_params"):
            flops += decoder_flops(cost["n_params"], cost["prompt_tokens"], cost["new_tokens"])
            precision = cost["precision"] if not training else "float32"  # training is float32 whatever the eval engine
            if seed in training and training[seed].get("train_tokens"):
                flops += training_flops(cost["n_params"], training[seed]["train_tokens"])
    note = f"{n} questions" + (f", {len(training)} training run(s)" if training else "")
    record(StageTiming(f"row {cfg.name}", compute_s, flops or None, precision if flops else None, note), profile)


def seed_summary(per_seed) -> dict:
    """Mean and sample sd over seeds of each metric (all questions)."""
    out = {"seeds": [s for s, *_ in per_seed]}
    for m in ("em", "f1", "match"):
        values = np.array([metrics["all"][m]["mean"] for *_, metrics in per_seed])
        out[m] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                  "values": values.tolist()}
    return out
