"""The sections of an experiment config (data, retriever, generator, training): one dataclass each,
every field with a default and a help string, checked on construction; the error type and the
field helper every section uses."""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from rag_lab.io import UserError


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
