"""Stage 1, data: the models resolved before any work, the eval questions (and their lenses), the
train pool made disjoint from them (`leak_guard`), the corpus when the regime retrieves."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from rag_lab.config import ConfigError, ExperimentConfig
from rag_lab.data import DATASETS, load_qa
from rag_lab.data.records import QAExample
from rag_lab.data.subsets import corpus_for, subset_questions
from rag_lab.io import DataError
from rag_lab.metrics import normalize_answer
from rag_lab.models import ModelNotFoundError, resolve_model
from rag_lab.runner.plan import RunData, STAGES


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
