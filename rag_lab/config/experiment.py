"""The regime table and the configs built from sections: an experiment (one row of the main table)
and the retrieval study of notebook 01."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rag_lab.config.sections import (ConfigError, DataConfig, GeneratorConfig, RetrieverConfig, TrainingConfig, _help,
                                     check_name)


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
