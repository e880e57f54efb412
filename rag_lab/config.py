"""Typed experiment configuration: one dataclass per component, strict YAML loading.

An experiment YAML overrides only what changes; every field has a default and a help
string. Unknown or misspelt keys and wrong types are errors that name the key:

    name: rag_zero_shot_bm25
    regime: rag
    retriever: {kind: bm25, k: 5}
    profiles:
      smoke: {data: {n_eval: 20}}     # why: seconds, for CI and notebook tests
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from rag_lab.io import UserError, check_not_protected, check_replaceable
from rag_lab.paths import REPO_ROOT, repo_path


class ConfigError(UserError, ValueError):
    """A bad configuration; the message names the file and the key."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, late: bool = False):
    """A dataclass field with a one-line help string in its metadata. `late`: a field added after
    results were recorded, left out of cache keys while it holds its default (see `key_view`)."""
    metadata = {"help": text, "late": late}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def key_view(section) -> dict[str, Any]:
    """A config section as it enters cache keys and training records: every field, except the
    `late` ones that hold their default, so adding a field moves no existing run id or cache."""
    out = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        if f.metadata.get("late") and out[f.name] == f.default:
            del out[f.name]
    return out


PROFILES = ("smoke", "default", "extended", "full")
CT2_COMPUTE_TYPES = ("auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32")


@dataclass
class DataConfig:
    dataset: str = _help("QA dataset: a registered name (nq-mini, nq-open), a file, or hf:<id>", "nq-mini")
    corpus: str = _help("passage corpus: a registered name, a file, or hf:<id>", "nq-mini")
    train_split: str = _help("split used for training and few-shot demonstrations", "train")
    eval_split: str = _help("split the table reports on", "eval")
    n_eval: int | None = _help("evaluate on a seeded random subset of this many questions (None: all)", None)
    n_train: int | None = _help("train on a seeded random subset of this many questions (None: all)", None)
    n_corpus: int | None = _help("keep only the first N passages plus every passage holding an eval answer (smoke)", None)
    subset_seed: int = _help("seed for the eval/train subsets", 0)
    window_words: int | None = _help("split every passage into sentence windows of at most this many words (None: the "
                                     "corpus's passages as they are)", None)
    only_answer_in_corpus: bool = _help("evaluate only the questions whose gold answer occurs in the corpus (after n_eval)", False)
    only_gold_passage: bool = _help("evaluate only the questions with an annotated gold passage (after n_eval): the "
                                    "gold-passage oracle's lens", False, late=True)

    def __post_init__(self):
        for key in ("n_eval", "n_train", "n_corpus", "window_words"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{key} must be positive or null, got {value}")


@dataclass
class RetrieverConfig:
    kind: Literal["none", "bm25", "dense", "hybrid", "oracle", "gold"] = _help(
        "retriever; none = closed-book; gold = the NQ-annotated gold passage (questions' gold_passage_id), oracle = "
        "passages holding a gold answer string (both regime oracle only: upper bounds, not systems)", "none")
    k: int = _help("passages handed to the reader", 5)
    # BM25 (bm25s)
    k1: float = _help("BM25 term-frequency saturation", 1.5)
    b: float = _help("BM25 length normalisation", 0.75)
    stopwords: str | None = _help("stopword list for BM25 tokenisation (bm25s name, e.g. 'en'; None: keep all)", "en")
    stemmer: str | None = _help("PyStemmer language for BM25 (None: no stemming)", "english")
    # dense (sentence-transformers encoder + FAISS)
    encoder: str = _help("dense encoder: embedded name, local path or hub id", "all-minilm-l6-v2")
    query_prefix: str = _help("prepended to queries (e5: 'query: ')", "")
    passage_prefix: str = _help("prepended to passages (e5: 'passage: ')", "")
    max_length: int = _help("encoder max sequence length in tokens", 256)
    index_factory: str = _help("FAISS index_factory string (Flat, HNSW32, IVF1024,PQ64, ...)", "Flat")
    search_params: str = _help("FAISS ParameterSpace string applied at search (e.g. 'efSearch=128', 'nprobe=16')", "")
    encode_batch_size: int = _help("passages per encoder batch", 64)
    encoder_backend: Literal["sentence-transformers", "ctranslate2"] = _help(
        "engine that encodes passages and questions: sentence-transformers (float32, the exact model) or ctranslate2 "
        "(int8 on CPU: faster corpus encoding, embeddings within ~0.003 cosine of float32; benchmarks/README.md)",
        "sentence-transformers", late=True)
    embedding_dtype: Literal["float32", "float16"] = _help(
        "dtype of the stored corpus embeddings (float16 halves the disk and memory of a large corpus; the index is "
        "built and searched in float32)", "float32", late=True)
    # hybrid
    fusion: Literal["rrf", "weighted"] = _help("hybrid fusion: reciprocal-rank or weighted normalised scores", "rrf")
    rrf_k: int = _help("RRF constant: score = sum 1/(rrf_k + rank)", 60)
    dense_weight: float = _help("weighted fusion: weight of the dense score (BM25 gets 1 - w)", 0.5)
    # end-to-end RAG (regime rag_e2e_ft) and the readers that weigh passages (generator.combine)
    temperature: float = _help("p_eta(z|x) = softmax over the top-k of score / temperature (scores are cosine similarities "
                               "of normalised embeddings, so a small value: 0.05 spreads a 0.1 score gap over 2 nats)", 0.05, late=True)
    query_encoder: str = _help("dense: encoder for the questions when it is not `encoder` (a query encoder trained end to "
                               "end; the passages keep `encoder`'s embeddings); empty: `encoder`", "", late=True)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"retriever.temperature must be positive, got {self.temperature}")
        if self.k <= 0:
            raise ConfigError(f"retriever.k must be positive, got {self.k}")
        if self.k1 <= 0 or not 0.0 <= self.b <= 1.0:  # k1 <= 0 scores every passage 0
            raise ConfigError(f"retriever.k1 must be positive and retriever.b in [0, 1], got k1={self.k1}, b={self.b}")
        for key in ("rrf_k", "encode_batch_size", "max_length"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"retriever.{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ConfigError(f"retriever.dense_weight must be in [0, 1], got {self.dense_weight}")


@dataclass
class GeneratorConfig:
    kind: Literal["decoder", "seq2seq", "extractive"] = _help("reader family", "decoder")
    model: str = _help("embedded name, local path or hub id", "smollm2-135m-instruct")
    backend: Literal["transformers", "ctranslate2", "vllm"] = _help(
        "inference engine for decoder readers: transformers (float32), or ctranslate2 (int8 on CPU: decoding several "
        "times faster, prefill about the same; the checkpoint is converted once and cached), or vllm (GPUs: paged "
        "attention and continuous batching over each generator.batch_size prompts, so set it large; the vllm package "
        "is not part of the default install)", "transformers")
    vllm_tensor_parallel: int = _help("vllm: GPUs one engine shards the model over (data parallel: one engine per "
                                      "GPU group through rag_lab.scale.ray_generate)", 1, late=True)
    vllm_dtype: str = _help("vllm: weight/activation dtype (auto: the checkpoint's; float16, bfloat16, float32)", "auto", late=True)

    ct2_compute_type: str = _help("ctranslate2 compute type: auto (int8 on CPU, int8_float16 on CUDA), int8, float32, "
                                  "float16, int8_float16, ...", "auto")
    max_new_tokens: int = _help("greedy decoding budget", 16)
    batch_size: int = _help("questions per generation batch", 16)
    max_input_tokens: int = _help("prompt budget; passages are cut to fit, never the question", 1024)
    max_context_tokens: int | None = _help("budget for the passages alone, in the reader's tokens: as many of the top-k "
                                           "as fit, the last one cut (None: whatever max_input_tokens leaves)", None)
    use_chat_template: bool = _help("wrap prompts in the tokenizer's chat template when it has one", True)
    system_prompt: str = _help("system message (chat mode)", "Answer the question with a short phrase of a few words, no full sentence.")
    closed_book_template: str = _help("prompt for closed-book mode; must contain {question}", "Question: {question}\nAnswer:")
    rag_template: str = _help("prompt for RAG mode; must contain {context} and {question}",
                              "{context}\n\nUsing the passages above, answer the question.\nQuestion: {question}\nAnswer:")
    n_few_shot: int = _help("demonstrations drawn from the train split with a fixed seed", 0)
    strip_prefixes: list[str] = _help("boilerplate removed from the start of answers",
                                      factory=lambda: ["the answer to the question is", "the answer is", "answer:"])
    combine: Literal["concat", "rag_sequence", "rag_token", "fid"] = _help(
        "how the reader uses its k passages: concat (one prompt), rag_sequence / rag_token (one prompt per passage, "
        "marginalised with p_eta(z|x): Lewis et al. 2020), fid (Fusion-in-Decoder, encoder-decoder readers)", "concat", late=True)
    rag_sequence_decoding: Literal["thorough", "fast"] = _help(
        "combine rag_sequence: thorough scores every passage's candidate against every passage (the paper's); fast only "
        "against the passages that produced it", "thorough", late=True)

    def __post_init__(self):
        if self.combine != "concat" and self.backend != "transformers":
            raise ConfigError(f"generator.combine {self.combine!r} runs on generator.backend: transformers (it scores each passage)")
        if self.combine == "fid" and self.kind != "seq2seq":
            raise ConfigError("generator.combine: fid needs an encoder-decoder reader (generator.kind: seq2seq)")
        if self.combine != "concat" and self.kind == "extractive":
            raise ConfigError("generator.combine: the extractive reader already reads each passage alone; use concat")
        if "{question}" not in self.closed_book_template:
            raise ConfigError("generator.closed_book_template must contain {question}")
        if "{question}" not in self.rag_template or "{context}" not in self.rag_template:
            raise ConfigError("generator.rag_template must contain {context} and {question}")
        for key, allowed in (("closed_book_template", {"question"}), ("rag_template", {"question", "context"})):
            fields = _template_fields(getattr(self, key), f"generator.{key}")
            if fields - allowed:
                raise ConfigError(f"generator.{key} has unknown field(s) {', '.join(sorted('{' + f + '}' for f in fields - allowed))}: "
                                  f"it may use {', '.join(sorted('{' + f + '}' for f in allowed))} (write {{{{ and }}}} for literal braces)")
        for key in ("max_new_tokens", "batch_size", "max_input_tokens", "max_context_tokens"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"generator.{key} must be positive, got {getattr(self, key)}")
        if self.n_few_shot < 0:
            raise ConfigError(f"generator.n_few_shot must be >= 0, got {self.n_few_shot}")
        if self.backend in ("ctranslate2", "vllm") and self.kind != "decoder":
            raise ConfigError(f"generator.backend: {self.backend} serves decoder readers here; generator.kind {self.kind!r} "
                              "runs on backend: transformers")
        if self.vllm_tensor_parallel < 1:
            raise ConfigError(f"generator.vllm_tensor_parallel must be >= 1, got {self.vllm_tensor_parallel}")
        if self.ct2_compute_type not in CT2_COMPUTE_TYPES:
            raise ConfigError(f"generator.ct2_compute_type {self.ct2_compute_type!r}: choose one of {', '.join(CT2_COMPUTE_TYPES)}")


@dataclass
class TrainingConfig:
    enabled: bool = _help("fine-tune the generator before evaluating", False)
    method: Literal["full", "lora"] = _help("full fine-tuning or LoRA (peft; merged into the weights after training)", "full")
    learning_rate: float = _help("peak learning rate", 5e-5)
    epochs: float = _help("passes over the training subset", 2.0)
    batch_size: int = _help("examples per device step", 8)
    grad_accum: int = _help("gradient accumulation steps", 1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _help("learning-rate schedule", "linear")
    warmup_ratio: float = _help("fraction of steps spent warming up", 0.05)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    eval_steps: int = _help("evaluate dev EM (and save a checkpoint) every N optimiser steps", 50)
    patience: int = _help("early stopping: evaluations without a better dev EM", 3)
    group_by_length: bool = _help("length-grouped batches (less padding)", True)
    lora_r: int = _help("LoRA rank", 16)
    lora_alpha: int = _help("LoRA alpha", 32)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    lora_targets: list[str] = _help("LoRA target module names", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dev_size: int = _help("questions held out from train for dev EM / early stopping", 100)
    seeds: list[int] = _help("training seeds; the table reports mean ± sd over them", factory=lambda: [0])
    tensorboard: bool = _help("log to TensorBoard in the checkpoint folder", False)
    gradient_checkpointing: bool = _help("recompute activations in the backward pass: less memory, ~30% more time, "
                                         "the same weights", False)
    save_optimizer: bool = _help("checkpoints keep the optimizer state, so an interrupted run resumes exactly; false "
                                 "writes a third of the bytes and an interrupted run starts over", True)
    output: str = _help("checkpoint folder (relative: from the repo root); empty: cache/train/<experiment>-<hash>", "")
    keep_checkpoints: bool = _help("keep the chosen and the last checkpoint once training is done (the Trainer keeps no "
                                   "others); false deletes both after the final model is saved: ~3.2 GB less per "
                                   "SmolLM2 row, and a later run with more epochs starts over", True, late=True)
    # end-to-end RAG (regime rag_e2e_ft): the retriever's query encoder trained through the reader's loss
    objective: Literal["lm", "rag_sequence", "rag_token", "pdist"] = _help(
        "lm: the reader's loss on fixed passages; rag_sequence / rag_token: the marginal likelihood over the top-k "
        "(Lewis et al. 2020); pdist: Atlas perplexity distillation (Izacard et al. 2022)", "lm", late=True)
    query_learning_rate: float = _help("peak learning rate of the query encoder (end-to-end objectives)", 2e-5, late=True)
    target_temperature: float = _help("pdist: p_target(z) ∝ exp(log p_theta(y|x,z) / target_temperature)", 1.0, late=True)
    refresh_every: int = _help("end-to-end objectives: re-encode the corpus with the current query encoder every N steps "
                               "(an Atlas-style index refresh, passage side tied to the query side); 0: the passage "
                               "embeddings and index stay fixed, as in the RAG paper", 0, late=True)

    def __post_init__(self):
        if self.query_learning_rate <= 0 or self.target_temperature <= 0 or self.refresh_every < 0:
            raise ConfigError("training.query_learning_rate and target_temperature must be positive, refresh_every >= 0")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("training.learning_rate, epochs, batch_size and grad_accum must be positive")
        if not self.seeds:
            raise ConfigError("training.seeds must list at least one seed")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.dev_size < 0 or self.eval_steps <= 0:
            raise ConfigError("training.dev_size must be >= 0 and training.eval_steps > 0")
        if self.lora_r <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"training.lora_r and lora_alpha must be positive and lora_dropout in [0, 1), got "
                              f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if self.patience < 0 or self.weight_decay < 0:
            raise ConfigError(f"training.patience and weight_decay must be >= 0, got {self.patience}, {self.weight_decay}")
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"training.seeds must be distinct non-negative integers, got {self.seeds}")


ORACLE_RETRIEVERS = ("gold", "oracle")  # they read the answers or the annotation: regime oracle only


@dataclass(frozen=True)
class Regime:
    """What a regime is, in one place: read by the config's validation, the runner's stage plan, the
    index command and the results tables (which sort and label rows by it)."""

    retrieves: bool  # passages for every question (and for the training questions)
    trains: bool  # fine-tunes before evaluating
    training_enabled: bool | None  # what `training.enabled` must say (None: the regime trains whatever it says)
    end_to_end: bool = False  # trains the retriever's query encoder through the reader (an end-to-end objective)
    reader_kinds: tuple[str, ...] = ("decoder", "seq2seq")  # the generator.kind values it can read with
    oracle: bool = False  # reads the gold annotation or the answers: an upper bound, not a system


# In the order the comparison reads (the main table sorts its rows so).
REGIMES: dict[str, Regime] = {
    "closed_book": Regime(retrieves=False, trains=False, training_enabled=False),
    "closed_book_ft": Regime(retrieves=False, trains=True, training_enabled=True),
    "rag": Regime(retrieves=True, trains=False, training_enabled=False),
    "rag_ft": Regime(retrieves=True, trains=True, training_enabled=True),
    "rag_e2e_ft": Regime(retrieves=True, trains=True, training_enabled=True, end_to_end=True),
    "reader": Regime(retrieves=True, trains=True, training_enabled=None, reader_kinds=("extractive",)),
    "oracle": Regime(retrieves=True, trains=False, training_enabled=False, oracle=True),
}


@dataclass
class ExperimentConfig:
    name: str = _help("experiment name (the results-table key)", "unnamed")
    regime: Literal[tuple(REGIMES)] = _help(
        "which row of the comparison; rag_e2e_ft = the reader and the retriever's query encoder trained together "
        "(training.objective); oracle = the reader given a passage that holds the answer (an upper bound)", "closed_book")
    description: str = _help("one line on what this experiment tests", "")
    block: str = _help("the main table's block this row belongs to (rows sort by block, then regime)", "")
    seed: int = _help("global seed (sampling of demonstrations, training)", 0)
    data: DataConfig = _help("data", factory=DataConfig)
    retriever: RetrieverConfig = _help("retriever", factory=RetrieverConfig)
    generator: GeneratorConfig = _help("generator", factory=GeneratorConfig)
    training: TrainingConfig = _help("training", factory=TrainingConfig)

    def __post_init__(self):
        check_name(self.name)
        regime = REGIMES[self.regime]
        if regime.end_to_end != (self.training.objective != "lm"):
            raise ConfigError(f"regime {self.regime!r} and training.objective {self.training.objective!r} disagree: regime "
                              "rag_e2e_ft trains the retriever through the reader (objective rag_sequence, rag_token or pdist); "
                              "every other regime uses objective lm")
        if regime.end_to_end and self.retriever.kind != "dense":
            raise ConfigError(f"retriever.kind {self.retriever.kind!r}: regime {self.regime} trains a query encoder, which only "
                              "a dense retriever has (BM25 has none; hybrid is not supported): set retriever.kind: dense")
        if self.generator.kind not in regime.reader_kinds:
            raise ConfigError(f"regime '{self.regime}' needs generator.kind: {' or '.join(regime.reader_kinds)} "
                              f"(not {self.generator.kind})")
        if self.retriever.query_encoder and self.retriever.kind != "dense":
            raise ConfigError("retriever.query_encoder is a dense retriever's setting: set retriever.kind: dense")
        if regime.oracle != (self.retriever.kind in ORACLE_RETRIEVERS):
            raise ConfigError("the oracle retrievers read the gold annotation: retriever.kind: gold or oracle goes with "
                              "regime: oracle, and regime oracle needs one of them")
        if regime.retrieves and self.retriever.kind == "none":
            raise ConfigError(f"regime '{self.regime}' needs a retriever: set retriever.kind (bm25, dense, hybrid)")
        if not regime.retrieves and self.retriever.kind != "none":
            raise ConfigError(f"regime '{self.regime}' is closed-book: retriever.kind must be 'none'")
        if regime.training_enabled is not None and regime.training_enabled != self.training.enabled:
            raise ConfigError(f"regime '{self.regime}' and training.enabled={self.training.enabled} disagree "
                              "(fine-tuned regimes end in _ft and set training.enabled: true)")
        if self.generator.combine != "concat" and not regime.retrieves:
            raise ConfigError(f"generator.combine: {self.generator.combine} reads retrieved passages; regime "
                              f"'{self.regime}' is closed-book: use combine: concat")
        if self.generator.combine in ("rag_sequence", "rag_token") and self.retriever.kind != "dense":
            raise ConfigError(f"generator.combine: {self.generator.combine} weighs passages by softmax(score / "
                              f"retriever.temperature), which expects cosine similarities; {self.retriever.kind} scores "
                              "would give one-hot weights: use retriever.kind: dense, or combine: concat")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RetrieverTrainingConfig:
    base_encoder: str = _help("encoder to start from", "all-minilm-l6-v2")
    output: str = _help("where the fine-tuned encoder is saved (relative paths: from the repo root)", "cache/models/minilm-nq-mini")
    epochs: float = _help("passes over the mined (question, positive, hard negative) triples", 1.0)
    batch_size: int = _help("triples per batch (in-batch negatives grow with it)", 32)
    learning_rate: float = _help("peak learning rate", 2e-5)
    n_hard_negatives: int = _help("BM25 hard negatives per question", 1)
    mining_depth: int = _help("BM25 depth searched for positives and hard negatives", 100)
    seed: int = _help("training seed", 0)


@dataclass
class BudgetStudyConfig:
    """Answer recall per prompt token (notebook 01): which retriever and passage size to give the reader."""

    enabled: bool = _help("run the study", True)
    n_dev: int = _help("dev questions, a seeded subset of the train split (never the eval split)", 300)
    reader: str = _help("the reader whose tokenizer and prompt format count the tokens", "qwen2.5-coder-0.5b-instruct")
    budgets: list[int] = _help("context budgets, in reader tokens", factory=lambda: [64, 128, 192, 256, 384, 512])
    window_words: list[int] = _help("sentence-window sizes compared with the corpus's own passages", factory=lambda: [40])
    retrievers: list[str] = _help("names from `retrievers` to compare", factory=lambda: ["bm25", "dense", "hybrid"])
    depth: int = _help("passages retrieved per question before packing", 20)
    choose_at: int = _help("the budget the default RAG rows use; the best setting at it is reported", 192)

    def __post_init__(self):
        if self.choose_at not in self.budgets:
            raise ConfigError(f"budget.choose_at ({self.choose_at}) must be one of budget.budgets {self.budgets}")
        if self.n_dev <= 0 or self.depth <= 0 or min(self.budgets, default=0) <= 0:
            raise ConfigError("budget.n_dev, budget.depth and every budget must be positive")


@dataclass
class RetrievalStudyConfig:
    """The retriever comparison of notebook 01: answer recall@k of several retrievers."""

    name: str = _help("study name", "retrieval")
    data: DataConfig = _help("data", factory=DataConfig)
    retrievers: dict[str, RetrieverConfig] = _help("name -> retriever config, one table row each", factory=dict)
    ks: list[int] = _help("recall@k cut-offs reported in the table", factory=lambda: [1, 5, 10, 20, 100])
    depth: int = _help("passages retrieved per question (>= max ks)", 100)
    train_retriever: RetrieverTrainingConfig = _help("fine-tuning of the dense retriever", factory=RetrieverTrainingConfig)
    budget: BudgetStudyConfig = _help("answer recall per prompt token, on a dev split", factory=BudgetStudyConfig)

    def __post_init__(self):
        check_name(self.name)
        if not self.ks or min(self.ks) <= 0 or max(self.ks) > self.depth:
            raise ConfigError(f"ks must be positive and <= depth ({self.depth}), got {self.ks}")
        unknown = [r for r in self.budget.retrievers if r not in self.retrievers]
        if self.budget.enabled and unknown:
            raise ConfigError(f"budget.retrievers {unknown} are not among retrievers: {', '.join(self.retrievers)}")


def _template_fields(template: str, key: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{key}: not a valid template ({e}); write {{{{ and }}}} for literal braces") from None


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    """An experiment name becomes a folder under results/runs/: letters, digits and `_-.` only,
    not starting with a dot (so never `..`, an absolute path, or a hidden folder)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"name {name!r}: use letters, digits, '_', '-' and '.' (not first); it names the run's "
                          "folder under results/runs/")
    if len(name) > MAX_NAME:  # file names stop at 255 bytes; the cache folders add a hash and a prefix
        raise ConfigError(f"name {name[:40]!r}...: {len(name)} characters; at most {MAX_NAME} (it names folders)")
    return name


MAX_NAME = 120


# ---------------------------------------------------------------- loading

def _type_ok(value: Any, tp: Any) -> bool:
    """A small runtime type check for the annotation forms used above."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is float:  # YAML writes 1 for 1.0; bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_dict(cls: type, data: Any, where: str = "", section: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{section or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        keypath = f"{section}.{key}" if section else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{keypath}'{hint}; valid keys: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where, keypath)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{keypath}' must be a mapping of name -> {typing.get_args(tp)[1].__name__}")
            kwargs[key] = {str(k): from_dict(typing.get_args(tp)[1], v or {}, where, f"{keypath}.{k}") for k, v in value.items()}
        elif not _type_ok(value, tp):
            raise ConfigError(f"{where}: '{keypath}' = {value!r} is not of type {_type_name(tp)}")
        elif isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf pass every comparison check
            raise ConfigError(f"{where}: '{keypath}' = {value!r} is not a finite number")
        else:
            kwargs[key] = float(value) if tp is float else value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{{file}}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                  f"(first given on line {seen[key]}); the last one would silently win")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    """The mapping of one YAML file (yaml.safe_load rules, duplicate keys refused); errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file (name the experiment's .yaml file)") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(str(e).replace("{file}", str(path))) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); an experiment needs at least a regime")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping")
    return raw


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping merged over its `base:` file (a path relative to it), recursively."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another YAML file")
    return _deep_merge(_read_with_bases(path.parent / base, seen + (path.resolve(),)), raw)


def declared_profiles(path: str | Path) -> list[str]:
    """The profiles an experiment runs in: those named by `only_in:` when the file (or a base) has it,
    else "default" and every profile it writes a block for (an empty block counts: the top level as is)."""
    raw = _read_with_bases(Path(path))
    return _runs_in(Path(path), raw.get("only_in"), raw.get("profiles") or {})


def _runs_in(path: Path, only_in, profiles) -> list[str]:
    if not isinstance(profiles, dict) or any(p not in PROFILES for p in profiles):
        raise ConfigError(f"{path}: 'profiles' keys must be among {', '.join(PROFILES)}, got {list(profiles)}")
    if only_in is None:
        return ["default", *(p for p in PROFILES if p != "default" and p in profiles)]
    if not isinstance(only_in, list) or not only_in or any(p not in PROFILES for p in only_in):
        raise ConfigError(f"{path}: 'only_in' must list profiles among {', '.join(PROFILES)}, got {only_in!r}")
    return [p for p in PROFILES if p in only_in]


def experiments_in(paths: Sequence[str | Path], profile: str) -> dict[str, "ExperimentConfig"]:
    """The configs, by name, of the experiments among `paths` that run in `profile` (their `profiles:` /
    `only_in:` decide, not the caller); smoke runs those of the default profile, so a notebook's smoke run
    checks the cells of its default run in seconds."""
    selecting = "default" if profile == "smoke" else profile
    return {Path(p).stem: load_experiment(p, profile) for p in paths if selecting in declared_profiles(p)}


def is_study(path: str | Path) -> bool:
    """A retrieval study (`rag-lab retrieval`), not an experiment: it names retrievers to compare."""
    return "retrievers" in _read_with_bases(Path(path))


def parse_override(text: str) -> dict:
    """`section.key=value` (the value read as YAML: 10, true, [1, 2], a string) as a nested dict."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set retriever.k=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    out: Any = parsed
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_experiment(path: str | Path, profile: str = "default", cls: type = ExperimentConfig,
                    overrides: Sequence[str] = ()):
    """Load an experiment YAML (yaml.safe_load) and apply the overrides of `profile`, then `overrides`
    (command-line `--set key=value`, applied last and validated like the file; the run's config.json records them).

    `base: other.yaml` merges this file over another (shared settings live once);
    `profiles:` maps a profile name (smoke / extended / full) to a partial config; the
    default profile is the file's top level as written. A profile the file has no block for is an
    error naming the ones it has (an empty block runs the top level under that profile), and
    `only_in: [extended]` lists the only profiles an experiment runs in (the top level being the
    setting of a profile it lists when that profile has no block).
    """
    path = Path(path)
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    raw = _read_with_bases(path)
    profiles = raw.pop("profiles", {}) or {}
    only_in = raw.pop("only_in", None)
    runs_in = _runs_in(path, only_in, profiles)
    if profile not in runs_in:  # never the default silently in its place (FlashRAG's None-config failure)
        raise ConfigError(f"{path}: no {profile!r} profile: it runs in {', '.join(runs_in)} "
                          + ("only (its only_in)" if only_in is not None else
                             f"(add `profiles: {{{profile}: {{}}}}` to run its default settings under {profile})"))
    raw.setdefault("name", path.stem)
    merged = _deep_merge(raw, profiles.get(profile) or {})
    for text in overrides:
        merged = _deep_merge(merged, parse_override(text))
    where = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return resolve_paths(beside_config(from_dict(cls, merged, where=where), path.parent))


def beside_config(cfg, folder: Path):
    """Data files named by a relative path that exists beside the config file, not in the working
    directory, read from there (`data.dataset: qa.jsonl` next to the YAML works from any folder)."""
    data = getattr(cfg, "data", None)
    if data is None:
        return cfg
    moved = {key: str((folder / value).resolve()) for key in ("dataset", "corpus", "train_split")
             if (value := getattr(data, key)) and not Path(value).is_absolute() and not Path(value).exists()
             and (folder / value).is_file()}
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **moved)) if moved else cfg


def resolve_paths(cfg):
    """The config with its paths resolved once, so every stage reads the same folder whatever the
    working directory: output folders (`training.output`, `train_retriever.output`) that are
    relative are under the repo root; a model or encoder that names a relative path existing
    under the repo root (or the study's own `train_retriever.output`, built later) resolves
    there. Embedded names and hub ids are left as they are."""
    if isinstance(cfg, ExperimentConfig):
        output = _under_repo(cfg.training.output) if cfg.training.output else ""
        if output:  # the trainer writes checkpoints inside it and replaces <output>/seed<n>/final
            check_not_protected(Path(output), "training.output")
        return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, model=repo_path(cfg.generator.model)),
                                   retriever=dataclasses.replace(cfg.retriever, encoder=repo_path(cfg.retriever.encoder),
                                                                 query_encoder=repo_path(cfg.retriever.query_encoder) if cfg.retriever.query_encoder else ""),
                                   training=dataclasses.replace(cfg.training, output=output))
    if isinstance(cfg, RetrievalStudyConfig):
        t = cfg.train_retriever
        trained = _under_repo(t.output)
        check_replaceable(Path(trained), "train_retriever.output")  # the trained encoder replaces this folder

        def encoder(name: str) -> str:
            return trained if name == t.output or _under_repo(name) == trained else repo_path(name)

        retrievers = {k: dataclasses.replace(r, encoder=encoder(r.encoder)) for k, r in cfg.retrievers.items()}
        return dataclasses.replace(cfg, retrievers=retrievers,
                                   train_retriever=dataclasses.replace(t, output=trained, base_encoder=repo_path(t.base_encoder)),
                                   budget=dataclasses.replace(cfg.budget, reader=repo_path(cfg.budget.reader)))
    return cfg


def _under_repo(path: str) -> str:
    return path if Path(path).is_absolute() else str(REPO_ROOT / path)


def config_help(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per field: key, default, help — for `rag-lab config-help`."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            lines += config_help(f.default_factory, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
