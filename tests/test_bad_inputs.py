"""Bad inputs, table-driven: each case states the input and what must happen — an error whose
message names the file/line or key (a fragment of it is asserted), or a documented repair — and
that nothing under results/ changed when it is an error. (Issue 13's suite; it grows with each fix.)"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from rag_lab.config import ConfigError, ExperimentConfig, RetrievalStudyConfig, load_experiment
from rag_lab.data import load_corpus, load_qa
from rag_lab.io import DataError
from rag_lab.paths import results_dir


@dataclass(frozen=True)
class Case:
    id: str
    write: Callable[[Path], Path]  # builds the bad input under a temp folder, returns the path to load
    load: Callable[[Path], object]
    error: type[Exception] | None  # None: must load (a repair or the documented handling)
    message: str = ""  # a fragment of the error; for a repair, checked by `check`
    check: Callable[[object], bool] | None = None


def text(name: str, body: str | bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        (path.write_bytes if isinstance(body, bytes) else path.write_text)(body)
        return path
    return write


def jsonl(name: str, rows: list) -> Callable[[Path], Path]:
    return text(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def parquet(name: str, rows: list[dict]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        pd.DataFrame(rows).to_parquet(folder / name)
        return folder / name
    return write


def gz(name: str, body: bytes, cut: int | None = None) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        data = gzip.compress(body, mtime=0)
        (folder / name).write_bytes(data[:cut] if cut else data)
        return folder / name
    return write


def experiment(path: Path):
    return load_experiment(path)


def study(path: Path):
    return load_experiment(path, cls=RetrievalStudyConfig)


def qa(path: Path):
    return load_qa(str(path))


def corpus(path: Path):
    return load_corpus(str(path))


Q = {"id": "q1", "question": "who wrote hamlet", "answers": ["Shakespeare"]}
P = {"id": "p1", "title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare."}

CONFIG_CASES = [
    # issue 23: a profile without a block is an error naming the ones the file has, never the default in its place
    Case("profile-without-block", text("x.yaml", "regime: closed_book\n"), lambda p: load_experiment(p, "extended"), ConfigError,
         "x.yaml: no 'extended' profile: it runs in default (add `profiles: {extended: {}}`"),
    Case("profile-empty-block-runs-the-top-level", text("x.yaml", "regime: closed_book\nprofiles: {extended: {}}\n"),
         lambda p: load_experiment(p, "extended"), None, check=lambda c: c.regime == "closed_book"),
    Case("profile-null-block-runs-the-top-level", text("x.yaml", "regime: closed_book\nprofiles:\n  extended:\n"),
         lambda p: load_experiment(p, "extended"), None, check=lambda c: c.regime == "closed_book"),
    Case("only-in-excludes-default", text("x.yaml", "regime: closed_book\nonly_in: [smoke, extended]\n"), experiment, ConfigError,
         "x.yaml: no 'default' profile: it runs in smoke, extended only (its only_in)"),
    Case("only-in-unknown-profile", text("x.yaml", "regime: closed_book\nonly_in: [huge]\n"), experiment, ConfigError,
         "x.yaml: 'only_in' must list profiles among smoke, default, extended, full, got ['huge']"),
    Case("only-in-not-a-list", text("x.yaml", "regime: closed_book\nonly_in: extended\n"), experiment, ConfigError,
         "'only_in' must list profiles among"),
    Case("yaml-duplicate-top-key", text("x.yaml", "regime: rag\nregime: closed_book\n"), experiment, ConfigError,
         "x.yaml:2: duplicate key 'regime' (first given on line 1)"),
    Case("yaml-duplicate-nested-key", text("x.yaml", "regime: closed_book\ngenerator:\n  batch_size: 4\n  batch_size: 8\n"),
         experiment, ConfigError, "x.yaml:4: duplicate key 'batch_size'"),
    Case("yaml-empty-file", text("x.yaml", ""), experiment, ConfigError, "x.yaml: the file is empty"),
    Case("yaml-only-comments", text("x.yaml", "# nothing here\n"), experiment, ConfigError, "the file is empty"),
    Case("yaml-not-a-mapping", text("x.yaml", "- a\n- b\n"), experiment, ConfigError, "must be a mapping"),
    Case("yaml-syntax", text("x.yaml", "regime: [rag\n"), experiment, ConfigError, "x.yaml:2: invalid YAML"),
    Case("yaml-not-utf8", text("x.yaml", b"regime: rag\ndescription: caf\xe9\n"), experiment, ConfigError, "not UTF-8"),
    Case("yaml-missing-file", lambda f: f / "nope.yaml", experiment, ConfigError, "nope.yaml: no such experiment file"),
    Case("yaml-a-folder", lambda f: (f / "exp.yaml").mkdir() or f / "exp.yaml", experiment, ConfigError,
         "exp.yaml: is a folder, not a YAML file"),
    Case("yaml-base-a-folder", lambda f: (f / "sub").mkdir() or (f / "x.yaml").write_text("base: sub\nregime: closed_book\n") and f / "x.yaml",
         experiment, ConfigError, "sub: is a folder, not a YAML file"),
    Case("name-too-long", text("x.yaml", "name: " + "a" * 300 + "\nregime: closed_book\n"), experiment, ConfigError,
         "300 characters; at most 120"),
    Case("key-unknown", text("x.yaml", "regime: closed_book\ngenerator: {batchsize: 4}\n"), experiment, ConfigError,
         "unknown key 'generator.batchsize' (did you mean 'batch_size'?)"),
    Case("bool-as-string", text("x.yaml", "regime: closed_book\ndata: {only_answer_in_corpus: 'false'}\n"), experiment,
         ConfigError, "'data.only_answer_in_corpus' = 'false' is not of type bool"),
    Case("bool-as-int", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: 1}\n"), experiment, ConfigError,
         "'training.enabled' = 1 is not of type bool"),
    Case("int-as-string", text("x.yaml", "regime: closed_book\ngenerator: {batch_size: '8'}\n"), experiment, ConfigError,
         "'generator.batch_size' = '8' is not of type int"),
    Case("int-as-bool", text("x.yaml", "regime: closed_book\ngenerator: {batch_size: true}\n"), experiment, ConfigError,
         "'generator.batch_size' = True is not of type int"),
    Case("float-as-string", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, learning_rate: 'fast'}\n"),
         experiment, ConfigError, "'training.learning_rate' = 'fast' is not of type float"),
    Case("list-as-string", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, seeds: '0 1'}\n"), experiment,
         ConfigError, "'training.seeds'"),
    Case("section-as-scalar", text("x.yaml", "regime: closed_book\ngenerator: 5\n"), experiment, ConfigError,
         "'generator' must be a mapping"),
    Case("literal-unknown-regime", text("x.yaml", "regime: rga\n"), experiment, ConfigError, "'regime' = 'rga'"),
    Case("literal-unknown-backend", text("x.yaml", "regime: closed_book\ngenerator: {backend: tensorrt}\n"), experiment,
         ConfigError, "'generator.backend' = 'tensorrt'"),
    Case("regime-without-retriever", text("x.yaml", "regime: rag\n"), experiment, ConfigError, "needs a retriever"),
    Case("closed-book-with-retriever", text("x.yaml", "regime: closed_book\nretriever: {kind: bm25}\n"), experiment,
         ConfigError, "is closed-book"),
    Case("ft-regime-training-off", text("x.yaml", "regime: closed_book_ft\n"), experiment, ConfigError, "disagree"),
    Case("k-zero", text("x.yaml", "regime: rag\nretriever: {kind: bm25, k: 0}\n"), experiment, ConfigError,
         "retriever.k must be positive"),
    Case("template-without-question", text("x.yaml", "regime: closed_book\ngenerator: {closed_book_template: 'Q:'}\n"),
         experiment, ConfigError, "closed_book_template must contain {question}"),
    Case("n-eval-zero", text("x.yaml", "regime: closed_book\ndata: {n_eval: 0}\n"), experiment, ConfigError,
         "data.n_eval must be positive"),
    Case("unknown-profile-key", text("x.yaml", "regime: closed_book\nprofiles: {tiny: {}}\n"), experiment, ConfigError,
         "'profiles' keys must be among"),
    Case("base-cycle", text("x.yaml", "base: x.yaml\nregime: closed_book\n"), experiment, ConfigError, "form a cycle"),
    Case("base-missing", text("x.yaml", "base: nope.yaml\nregime: closed_book\n"), experiment, ConfigError,
         "nope.yaml: no such experiment file"),
    Case("name-parent-dir", text("x.yaml", "name: ../x\nregime: closed_book\n"), experiment, ConfigError,
         "name '../x': use letters, digits"),
    Case("name-absolute", text("x.yaml", "name: /tmp/x\nregime: closed_book\n"), experiment, ConfigError, "name '/tmp/x'"),
    Case("name-dot", text("x.yaml", "name: .\nregime: closed_book\n"), experiment, ConfigError, "name '.'"),
    Case("name-space", text("x.yaml", "name: my run\nregime: closed_book\n"), experiment, ConfigError, "name 'my run'"),
    Case("name-not-string", text("x.yaml", "name: 12\nregime: closed_book\n"), experiment, ConfigError, "'name' = 12"),
    Case("name-from-file-stem-checked", text("bad name.yaml", "regime: closed_book\n"), experiment, ConfigError,
         "name 'bad name'"),
    Case("name-ok-dots-dashes", text("x.yaml", "name: qwen-2.5_rag\nregime: closed_book\n"), experiment, None,
         check=lambda cfg: cfg.name == "qwen-2.5_rag"),
    Case("study-name-parent-dir", text("r.yaml", "name: ../r\nretrievers: {bm25: {kind: bm25}}\n"), study, ConfigError,
         "name '../r'"),
    Case("profile-override-wrong-type", text("x.yaml", "regime: closed_book\nprofiles: {smoke: {data: {n_eval: ten}}}\n"),
         lambda p: load_experiment(p, "smoke"), ConfigError, "'data.n_eval' = 'ten'"),
    Case("profile-unknown-name", text("x.yaml", "regime: closed_book\n"), lambda p: load_experiment(p, "huge"), ConfigError,
         "unknown profile 'huge'"),
    Case("warmup-ratio-one", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, warmup_ratio: 1.0}\n"),
         experiment, ConfigError, "training.warmup_ratio must be in [0, 1)"),
    Case("seeds-empty", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, seeds: []}\n"), experiment,
         ConfigError, "training.seeds must list at least one seed"),
    Case("dense-weight-past-one", text("x.yaml", "regime: rag\nretriever: {kind: hybrid, dense_weight: 2}\n"), experiment,
         ConfigError, "retriever.dense_weight must be in [0, 1]"),
    Case("max-context-tokens-zero", text("x.yaml", "regime: closed_book\ngenerator: {max_context_tokens: 0}\n"), experiment,
         ConfigError, "generator.max_context_tokens must be positive"),
    Case("ct2-compute-type-unknown", text("x.yaml", "regime: closed_book\ngenerator: {backend: ctranslate2, ct2_compute_type: int4}\n"),
         experiment, ConfigError, "generator.ct2_compute_type 'int4'"),
    Case("ct2-for-extractive", text("x.yaml", "regime: reader\nretriever: {kind: bm25}\ntraining: {enabled: true}\n"
                                             "generator: {kind: extractive, backend: ctranslate2}\n"), experiment, ConfigError,
         "ctranslate2 serves decoder readers"),
    Case("few-shot-negative", text("x.yaml", "regime: closed_book\ngenerator: {n_few_shot: -1}\n"), experiment, ConfigError,
         "generator.n_few_shot must be >= 0"),
    Case("window-words-zero", text("x.yaml", "regime: closed_book\ndata: {window_words: 0}\n"), experiment, ConfigError,
         "data.window_words must be positive"),
    Case("oracle-retriever-outside-oracle-regime", text("x.yaml", "regime: rag\nretriever: {kind: oracle}\n"), experiment,
         ConfigError, "retriever.kind: gold or oracle goes with regime: oracle"),
    Case("reader-regime-with-decoder", text("x.yaml", "regime: reader\nretriever: {kind: bm25}\n"), experiment, ConfigError,
         "regime 'reader' needs generator.kind: extractive"),
    Case("study-budget-choose-at-not-a-budget", text("r.yaml", "retrievers: {bm25: {kind: bm25}}\n"
                                                               "budget: {retrievers: [bm25], budgets: [64, 128], choose_at: 100}\n"),
         study, ConfigError, "budget.choose_at (100) must be one of budget.budgets"),
    Case("study-budget-unknown-retriever", text("r.yaml", "retrievers: {bm25: {kind: bm25}}\nbudget: {retrievers: [dense]}\n"),
         study, ConfigError, "budget.retrievers ['dense'] are not among retrievers"),
    Case("study-retriever-bad-kind", text("r.yaml", "retrievers: {x: {kind: splade}}\n"), study, ConfigError,
         "'retrievers.x.kind' = 'splade'"),
    Case("study-ks-past-depth", text("r.yaml", "depth: 5\nks: [1, 10]\nretrievers: {bm25: {kind: bm25}}\n"), study,
         ConfigError, "ks must be positive and <= depth (5)"),
    Case("study-duplicate-retriever", text("r.yaml", "retrievers:\n  bm25: {kind: bm25}\n  bm25: {kind: dense}\n"),
         study, ConfigError, "r.yaml:3: duplicate key 'bm25'"),
    # issue 22: values out of range that used to be accepted (and run wrong) or fail deep inside a library
    Case("bm25-k1-negative", text("x.yaml", "regime: rag\nretriever: {kind: bm25, k1: -5}\n"), experiment, ConfigError, "retriever.k1 must be positive"),
    Case("bm25-b-above-one", text("x.yaml", "regime: rag\nretriever: {kind: bm25, b: 1.5}\n"), experiment, ConfigError, "retriever.b in [0, 1]"),
    Case("rrf-k-zero", text("x.yaml", "regime: rag\nretriever: {kind: bm25, rrf_k: 0}\n"), experiment, ConfigError, "retriever.rrf_k must be positive"),
    Case("encode-batch-zero", text("x.yaml", "regime: rag\nretriever: {kind: bm25, encode_batch_size: 0}\n"), experiment, ConfigError,
         "retriever.encode_batch_size must be positive"),
    Case("temperature-nan", text("x.yaml", "regime: rag\nretriever: {kind: dense, temperature: .nan}\n"), experiment,
         ConfigError, "'retriever.temperature' = nan is not a finite number"),
    Case("learning-rate-inf", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, learning_rate: .inf}\n"), experiment, ConfigError,
         "'training.learning_rate' = inf is not a finite number"),
    Case("lora-r-zero", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, lora_r: 0}\n"), experiment, ConfigError, "training.lora_r and lora_alpha must be positive"),
    Case("seeds-repeated", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, seeds: [1, 1]}\n"), experiment, ConfigError, "training.seeds must be distinct"),
    Case("seeds-negative", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, seeds: [-1]}\n"), experiment, ConfigError, "training.seeds must be distinct"),
    Case("patience-negative", text("x.yaml", "regime: closed_book_ft\ntraining: {enabled: true, patience: -1}\n"), experiment, ConfigError, "training.patience and weight_decay"),
    Case("rag-sequence-over-bm25", text("x.yaml", "regime: rag\nretriever: {kind: bm25, k: 5}\ngenerator: {combine: rag_sequence}\n"), experiment,
         ConfigError, "expects cosine similarities; bm25 scores would give one-hot weights"),
    Case("rag-token-closed-book", text("x.yaml", "regime: closed_book\ngenerator: {combine: rag_token}\n"), experiment,
         ConfigError, "regime 'closed_book' is closed-book: use combine: concat"),
]

DATA_CASES = [
    Case("qa-in-corpus-string-false", jsonl("qa.jsonl", [{**Q, "answer_in_corpus": "false"}]), qa, DataError,
         "qa.jsonl:1: 'answer_in_corpus' must be true, false or null, got 'false'"),
    Case("qa-in-corpus-int", jsonl("qa.jsonl", [{**Q, "answer_in_corpus": 1}]), qa, DataError,
         "'answer_in_corpus' must be true, false or null, got 1"),
    Case("qa-in-corpus-null-is-unknown", jsonl("qa.jsonl", [{**Q, "answer_in_corpus": None}]), qa, None,
         check=lambda qs: qs[0].answer_in_corpus is None),
    Case("qa-null-id", jsonl("qa.jsonl", [{**Q, "id": None}]), qa, DataError, "qa.jsonl:1: 'id' is null or empty"),
    Case("qa-empty-id", jsonl("qa.jsonl", [{**Q, "id": " "}]), qa, DataError, "'id' is null or empty"),
    Case("qa-no-question", jsonl("qa.jsonl", [{"id": "q", "answers": ["a"]}]), qa, DataError, "qa.jsonl:1: QA row has no 'question'"),
    Case("qa-blank-question", jsonl("qa.jsonl", [{**Q, "question": "  "}]), qa, DataError, "has no 'question'"),
    Case("qa-no-answers", jsonl("qa.jsonl", [{"id": "q", "question": "x"}]), qa, DataError, "no 'answers' or 'answer'"),
    Case("qa-empty-answers", jsonl("qa.jsonl", [{**Q, "answers": []}]), qa, DataError, "empty answers list"),
    Case("qa-answer-not-string", jsonl("qa.jsonl", [{**Q, "answers": [1969]}]), qa, DataError, "answers must be strings"),
    Case("qa-malformed-json", jsonl("qa.jsonl", [Q, "{not json"]), qa, DataError, "qa.jsonl:2: malformed JSON"),
    Case("qa-line-not-object", jsonl("qa.jsonl", ["[1, 2]"]), qa, DataError, "qa.jsonl:1: expected a JSON object"),
    Case("qa-duplicate-ids", jsonl("qa.jsonl", [Q, Q]), qa, DataError, "duplicate question id"),
    Case("qa-empty-file", text("qa.jsonl", ""), qa, DataError, "no QA examples"),
    Case("qa-unsupported-suffix", text("qa.csv", "id,question\n"), qa, DataError, "unsupported file type"),
    Case("qa-json-not-list", text("qa.json", json.dumps({"rows": []})), qa, DataError, "expected a JSON list"),
    Case("qa-json-record-not-object", text("qa.json", json.dumps([Q, 3])), qa, DataError, "qa.json: record 1 is not an object"),
    Case("qa-parquet-null-in-corpus", parquet("qa.parquet", [{**Q, "answer_in_corpus": None}, {**Q, "id": "q2", "answer_in_corpus": True}]),
         qa, None, check=lambda qs: [q.answer_in_corpus for q in qs] == [None, True]),
    Case("qa-parquet-null-question", parquet("qa.parquet", [{**Q, "question": None}]), qa, DataError, "qa.parquet: row 0: QA row has no 'question'"),
    Case("qa-gz-truncated", gz("qa.jsonl.gz", (json.dumps(Q) + "\n").encode() * 50, cut=40), qa, DataError,
         "qa.jsonl.gz: the gzip stream is damaged"),
    Case("qa-gz-not-gzip", text("qa.jsonl.gz", "plain text, not gzip\n"), qa, DataError, "qa.jsonl.gz: the gzip stream is damaged"),
    Case("qa-not-utf8", text("qa.jsonl", json.dumps(Q).encode() + b"\n" + b'{"id": "q2", "question": "caf\xe9"}\n'), qa,
         DataError, "qa.jsonl:2: not UTF-8"),
    Case("corpus-null-title-is-empty", jsonl("c.jsonl", [{**P, "title": None}]), corpus, None,
         check=lambda ps: ps[0].title == ""),
    Case("corpus-parquet-null-title-is-empty-not-nan", parquet("c.parquet", [{**P, "title": None}, {**P, "id": "p2"}]), corpus,
         None, check=lambda ps: [p.title for p in ps] == ["", "Hamlet"]),
    Case("corpus-title-not-string", jsonl("c.jsonl", [{**P, "title": 7}]), corpus, DataError, "c.jsonl:1: 'title' must be a string or null"),
    Case("corpus-null-text", jsonl("c.jsonl", [{**P, "text": None}]), corpus, DataError, "c.jsonl:1: corpus row has no 'text'"),
    Case("corpus-parquet-null-text", parquet("c.parquet", [{**P, "text": None}]), corpus, DataError, "c.parquet: row 0: corpus row has no 'text'"),
    Case("corpus-parquet-null-id", parquet("c.parquet", [{**P, "id": None}]), corpus, DataError, "'id' is null or empty"),
    Case("corpus-duplicate-ids", jsonl("c.jsonl", [P, P]), corpus, DataError, "duplicate"),
    Case("corpus-empty", text("c.jsonl", "\n"), corpus, DataError, "c.jsonl"),
    Case("corpus-missing-file", lambda f: f / "c.jsonl", corpus, DataError, "c.jsonl"),
    Case("corpus-not-utf8", text("c.jsonl", b'{"id": "p1", "title": "H\xff", "text": "x"}\n'), corpus, DataError,
         "c.jsonl:1: not UTF-8"),
    Case("corpus-tsv-not-utf8", text("c.tsv", b"id\ttext\ttitle\n1\tab\xffc\tT\n"), corpus, DataError, "c.tsv:2: not UTF-8"),
    Case("corpus-tsv-gz-truncated", gz("c.tsv.gz", b"id\ttext\ttitle\n" + b"1\tsome text\tT\n" * 400, cut=40), corpus,
         DataError, "c.tsv.gz: the gzip stream is damaged"),
    Case("corpus-tsv-field-past-csv-default-limit", text("c.tsv", "id\ttext\ttitle\n1\t" + "ab " * 60_000 + "\tT\n"), corpus,
         None, check=lambda ps: ps[0].text.split() == ["ab"] * 60_000),
    Case("corpus-tsv-open-quote", text("c.tsv", 'id\ttext\ttitle\n1\t"ab\tT\n2\tcd\tT\n'), corpus, DataError,
         "c.tsv:3: 2 fields, the header has 3"),
    Case("corpus-not-parquet", text("c.parquet", "id,text\np1,x\n"), corpus, DataError, "c.parquet: not a readable parquet file"),
    Case("qa-not-parquet", text("qa.parquet", b"PAR1" + b"\0" * 64), qa, DataError, "qa.parquet: not a readable parquet file"),
    Case("qa-json-not-utf8", text("qa.json", b'[{"id": "q1", "question": "caf\xe9", "answers": ["x"]}]'), qa, DataError,
         "qa.json: not UTF-8"),
    Case("qa-lone-surrogate-question", jsonl("qa.jsonl", ['{"id": "q1", "question": "who \\ud800 wrote", "answers": ["S"]}']), qa,
         DataError, "qa.jsonl:1: 'question' holds a lone surrogate"),
    Case("qa-lone-surrogate-answer", jsonl("qa.jsonl", ['{"id": "q1", "question": "who", "answers": ["S\\udc00"]}']), qa,
         DataError, "qa.jsonl:1: 'answers' holds a lone surrogate"),
    Case("corpus-lone-surrogate-text", jsonl("c.jsonl", ['{"id": "p1", "title": "H", "text": "x \\udc00 y"}']), corpus,
         DataError, "c.jsonl:1: 'text' holds a lone surrogate"),
    Case("corpus-lone-surrogate-id", jsonl("c.jsonl", ['{"id": "p\\ud83d", "title": "H", "text": "x"}']), corpus,
         DataError, "c.jsonl:1: 'id' holds a lone surrogate"),
]


def results_snapshot() -> dict[str, int]:
    root = results_dir()
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@pytest.mark.parametrize("case", CONFIG_CASES + DATA_CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path):
    before = results_snapshot()
    path = case.write(tmp_path)
    if case.error is None:
        assert case.check(case.load(path)), case.id
    else:
        with pytest.raises(case.error) as err:
            case.load(path)
        assert case.message in str(err.value), f"{case.id}: {err.value}"
    assert results_snapshot() == before, "an input error changed something under results/"


def test_the_suite_covers_every_category():
    ids = [c.id for c in CONFIG_CASES + DATA_CASES]
    assert len(ids) == len(set(ids))
    assert {i.split("-")[0] for i in ids} >= {"yaml", "key", "bool", "qa", "corpus", "study"}


# ---------------------------------------------------------------- more config cases: templates

TEMPLATE_CASES = [
    Case("template-unknown-field", text("x.yaml", "regime: closed_book\ngenerator: {closed_book_template: 'Q: {question} {bogus}'}\n"),
         experiment, ConfigError, "generator.closed_book_template has unknown field(s) {bogus}"),
    Case("template-rag-unknown-field", text("x.yaml", "regime: closed_book\ngenerator: {rag_template: '{context} {question} {passages}'}\n"),
         experiment, ConfigError, "generator.rag_template has unknown field(s) {passages}"),
    Case("template-unbalanced-brace", text("x.yaml", "regime: closed_book\ngenerator: {closed_book_template: 'Q: {question} }'}\n"),
         experiment, ConfigError, "not a valid template"),
    Case("template-literal-braces-ok", text("x.yaml", "regime: closed_book\ngenerator: {closed_book_template: '{{json}} {question}'}\n"),
         experiment, None, check=lambda cfg: "{{json}}" in cfg.generator.closed_book_template),
    Case("template-positional-field", text("x.yaml", "regime: closed_book\ngenerator: {closed_book_template: '{question} {0}'}\n"),
         experiment, ConfigError, "unknown field(s) {0}"),
]


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=lambda c: c.id)
def test_bad_template(case: Case, tmp_path):
    test_bad_input(case, tmp_path)


# ---------------------------------------------------------------- the CLI: one line per error, --debug for the traceback

def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from rag_lab.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


CLI_CASES = [  # (id, files to write, argv, exit code, fragment of the one line)
    ("cli-missing-experiment", {}, ["check-config", "{d}/nope.yaml"], 2, "nope.yaml: no such experiment file"),
    ("cli-duplicate-key", {"x.yaml": "regime: rag\nregime: rag\n"}, ["check-config", "{d}/x.yaml"], 2, "x.yaml:2: duplicate key"),
    ("cli-unknown-profile", {"x.yaml": "regime: closed_book\n"}, ["check-config", "{d}/x.yaml", "--profile", "huge"], 2, "invalid choice"),
    ("cli-empty-file", {"x.yaml": ""}, ["check-config", "{d}/x.yaml"], 2, "the file is empty"),
    ("cli-bad-name", {"x.yaml": "name: ../up\nregime: closed_book\n"}, ["check-config", "{d}/x.yaml"], 2, "name '../up'"),
    ("cli-unknown-model", {"x.yaml": "regime: closed_book\ngenerator: {model: no-such-org/no-such-model}\n"},
     ["run", "{d}/x.yaml"], 2, "generator.model: "),
    ("cli-unknown-encoder", {"x.yaml": "regime: rag\nretriever: {kind: dense, encoder: no-such-org/enc}\n"},
     ["run", "{d}/x.yaml"], 2, "retriever.encoder: "),
    ("cli-unknown-dataset", {"x.yaml": "regime: closed_book\ndata: {dataset: no-such-dataset}\n"},
     ["run", "{d}/x.yaml"], 2, "unknown dataset 'no-such-dataset'"),
    ("cli-few-shot-past-pool", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl', train_split: '{d}/train.jsonl'}\n"
                                          "generator: {n_few_shot: 5}\n", "qa.jsonl": json.dumps(Q) + "\n",
                                "train.jsonl": json.dumps(dict(Q, id="t1", question="who wrote macbeth")) + "\n"},
     ["run", "{d}/x.yaml"], 2, "generator.n_few_shot = 5 but the train split"),
    ("leak-file-dataset-without-train-file", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl'}\n"
                                                        "generator: {n_few_shot: 1}\n", "qa.jsonl": json.dumps(Q) + "\n"},
     ["run", "{d}/x.yaml"], 2, "split 'train' must be a file too: set data.train_split to the train file"),
    ("leak-same-file-for-train-and-eval", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl', train_split: '{d}/qa.jsonl'}\n"
                                                     "generator: {n_few_shot: 1}\n", "qa.jsonl": json.dumps(Q) + "\n"},
     ["run", "{d}/x.yaml"], 2, "share 1 question(s) (same id or same normalised text), e.g. 'q1'"),
    ("leak-same-text-other-id", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl', train_split: '{d}/t.jsonl'}\n"
                                           "generator: {n_few_shot: 1}\n", "qa.jsonl": json.dumps(Q) + "\n",
                                 "t.jsonl": json.dumps(dict(Q, id="t9", question="Who wrote Hamlet?")) + "\n"},
     ["run", "{d}/x.yaml"], 2, "share 1 question(s)"),
    ("leak-typographic-quote", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl', train_split: '{d}/t.jsonl'}\n"
                                          "generator: {n_few_shot: 1}\n",
                                "qa.jsonl": json.dumps(dict(Q, question="who wrote hamlet's play")) + "\n",
                                "t.jsonl": json.dumps(dict(Q, id="t9", question="Who wrote Hamlet\u2019s play?")) + "\n"},
     ["run", "{d}/x.yaml"], 2, "share 1 question(s)"),
    ("qa-id-a-list", {"x.yaml": "regime: closed_book\ndata: {dataset: '{d}/qa.jsonl', train_split: '{d}/t.jsonl'}\n",
                      "qa.jsonl": json.dumps(dict(Q, id=[1, 2])) + "\n", "t.jsonl": json.dumps(dict(Q, id="t9", question="x")) + "\n"},
     ["run", "{d}/x.yaml"], 2, "qa.jsonl:1: 'id' must be a string or an integer, got list [1, 2]"),
    ("leak-fine-tuning-from-eval-file", {"x.yaml": "regime: closed_book_ft\ntraining: {enabled: true}\n"
                                                   "data: {dataset: '{d}/qa.jsonl'}\n", "qa.jsonl": json.dumps(Q) + "\n"},
     ["run", "{d}/x.yaml"], 2, "must be a file too"),
    ("cli-ok-check", {"x.yaml": "regime: closed_book\n"}, ["check-config", "{d}/x.yaml"], 0, "ok "),
    ("cli-ray-zero-workers", {"x.yaml": "regime: rag\nretriever: {kind: dense}\n"},
     ["index", "{d}/x.yaml", "--ray", "--workers", "0"], 2, "--workers 0: --ray needs at least one worker"),
    ("cli-k-past-the-corpus", {"x.yaml": "regime: rag\nretriever: {kind: bm25, k: 9}\n"
                                         "data: {dataset: '{d}/qa.jsonl', train_split: '{d}/t.jsonl', corpus: '{d}/c.jsonl'}\n"
                                         "generator: {model: smollm2-135m-instruct}\n",
                               "qa.jsonl": json.dumps(Q) + "\n", "t.jsonl": json.dumps(dict(Q, id="t9", question="x")) + "\n",
                               "c.jsonl": json.dumps(P) + "\n"},
     ["run", "{d}/x.yaml"], 2, "retriever.k = 9 is larger than the corpus (1 passages"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c[0])
def test_cli_prints_one_line_per_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))  # (the model cache stays: make models built it)
    _, files, argv, code, fragment = case
    for name, body in files.items():
        (tmp_path / name).write_text(body.replace("{d}", str(tmp_path)))
    got, out = run_cli([a.replace("{d}", str(tmp_path)) for a in argv], capsys)
    assert got == code and fragment in out, out
    if code == 2 and "invalid choice" not in fragment:
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "results" / "runs").exists()


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    from rag_lab.cli import main

    (tmp_path / "x.yaml").write_text("regime: rag\nregime: rag\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        main(["--debug", "check-config", str(tmp_path / "x.yaml")])


# ---------------------------------------------------------------- the results table and the run folders

COMMITTED = Path(__file__).resolve().parent.parent / "results"


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A copy of the committed default results (real run folders) to damage."""
    import shutil

    root = tmp_path / "results"
    shutil.copytree(COMMITTED / "runs", root / "runs")
    shutil.copy(COMMITTED / "main_table.csv", root / "main_table.csv")
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(root))
    return root


def committed_rows() -> list[tuple]:
    table = pd.read_csv(COMMITTED / "main_table.csv")
    return sorted(zip(table["experiment"], table["eval_set"], table["em"], table["f1"], table["run"]))


def damage_empty(p: Path) -> None:
    p.write_text("")


def damage_header_only(p: Path) -> None:
    p.write_text(p.read_text().splitlines()[0] + "\n")


def damage_truncated_mid_row(p: Path) -> None:
    body = p.read_bytes()
    p.write_bytes(body[: len(body) * 2 // 3])


def damage_rows_lost(p: Path) -> None:
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:-3]))


def damage_missing(p: Path) -> None:
    p.unlink()


def damage_column_dropped(p: Path) -> None:
    pd.read_csv(p).drop(columns=["em"]).to_csv(p, index=False)


def damage_binary(p: Path) -> None:
    p.write_bytes(b"\x00\xff\xfe garbage \x00" * 10)


def damage_cell_blanked(p: Path) -> None:
    t = pd.read_csv(p)
    t.loc[2, "em"] = None
    t.to_csv(p, index=False)


def damage_row_duplicated(p: Path) -> None:
    t = pd.read_csv(p)
    pd.concat([t, t.iloc[[3]]]).to_csv(p, index=False)


def damage_em_edited(p: Path) -> None:
    t = pd.read_csv(p)
    t.loc[1, "em"] = 0.999
    t.to_csv(p, index=False)


def damage_run_cell_wrong(p: Path) -> None:
    t = pd.read_csv(p)
    t.loc[0, "run"] = t.loc[1, "run"]
    t.to_csv(p, index=False)


TABLE_DAMAGE = [damage_empty, damage_header_only, damage_truncated_mid_row, damage_rows_lost, damage_missing,
                damage_column_dropped, damage_binary, damage_cell_blanked, damage_row_duplicated, damage_em_edited,
                damage_run_cell_wrong]


@pytest.mark.parametrize("damage", TABLE_DAMAGE, ids=lambda f: "table-" + f.__name__.removeprefix("damage_"))
def test_a_damaged_main_table_is_detected_and_rebuilt_from_the_run_folders(damage, results, capsys):
    from rag_lab.reporting.runs import main_table_problem, repair_main_table

    assert main_table_problem() is None
    damage(results / "main_table.csv")
    problem = main_table_problem()
    assert problem and "main_table.csv" in problem
    assert repair_main_table() == problem and "rebuilding it from the run folders" in capsys.readouterr().err
    assert main_table_problem() is None
    rebuilt = pd.read_csv(results / "main_table.csv")
    assert sorted(zip(rebuilt["experiment"], rebuilt["eval_set"], rebuilt["em"], rebuilt["f1"], rebuilt["run"])) == committed_rows()
    assert (results / "main_table.md").read_text() == (COMMITTED / "main_table.md").read_text()


def test_a_row_whose_run_folder_is_gone_is_found_and_dropped_by_the_rebuild(results, capsys):
    import shutil

    from rag_lab.reporting.runs import main_table_problem, repair_main_table

    gone = next((results / "runs" / "qwen_rag").iterdir())
    shutil.rmtree(gone)
    problem = main_table_problem()
    assert problem and f"names run folder runs/qwen_rag/{gone.name}, which is missing" in problem
    assert repair_main_table() == problem and main_table_problem() is None
    assert sorted(pd.read_csv(results / "main_table.csv")["experiment"]) == sorted(e for e, *_ in committed_rows() if e != "qwen_rag")


def test_cli_table_rebuild_and_runs_check(results, capsys):
    damage_empty(results / "main_table.csv")
    code, out = run_cli(["runs", "--check"], capsys)
    assert code == 1 and "BAD  main_table.csv" in out and "rag-lab table --rebuild" in out
    code, out = run_cli(["table", "--rebuild"], capsys)
    assert code == 0 and "rebuilt from the run folders" in out and "qwen_rag" in out
    assert run_cli(["runs", "--check"], capsys)[0] == 0


RUN_DAMAGE = [  # (id, how to damage one run folder, fragment of the report)
    ("run-missing-metrics", lambda d: (d / "metrics.json").unlink(), "incomplete: no metrics.json"),
    ("run-missing-predictions", lambda d: (d / "predictions.jsonl").unlink(), "incomplete: no predictions.jsonl"),
    ("run-truncated-predictions", lambda d: (d / "predictions.jsonl").write_text(
        "".join((d / "predictions.jsonl").read_text().splitlines(keepends=True)[:10])), "predictions.jsonl has 10 rows"),
    ("run-corrupt-metrics", lambda d: (d / "metrics.json").write_text("{"), "unreadable"),
    ("run-corrupt-timings", lambda d: (d / "timings.json").write_text("{"), "unreadable"),
    ("run-config-not-a-config", lambda d: (d / "config.json").write_text(json.dumps({"name": "closed_book_zero_shot", "regime": "rga"})),
     "unreadable: ConfigError"),
    ("run-metrics-without-scores", lambda d: (d / "metrics.json").write_text(json.dumps({"all": {"n": 500}})), "unreadable: KeyError"),
    ("run-renamed-experiment", lambda d: d.rename(d.parent.parent / "other_name" / d.name) if (d.parent.parent / "other_name").mkdir() is None else None,
     "inconsistent: config.json names 'closed_book_zero_shot'"),
]


@pytest.mark.parametrize("case", RUN_DAMAGE, ids=lambda c: c[0])
def test_runs_check_reports_a_damaged_run_folder(case, results, capsys):
    from rag_lab.reporting.runs import repair_main_table

    _, damage, fragment = case
    damage(next((results / "runs" / "closed_book_zero_shot").iterdir()))
    code, out = run_cli(["runs", "--check"], capsys)
    assert code == 1 and fragment in out, out
    assert run_cli(["runs"], capsys)[0] == 0  # without --check it lists and exits 0
    repair_main_table()  # one damaged folder never stops the next run: its row is dropped, saying so
    assert "closed_book_zero_shot" not in pd.read_csv(results / "main_table.csv")["experiment"].tolist()


def test_a_run_folder_appears_only_complete(tmp_path, monkeypatch):
    from rag_lab.reporting import runs
    from rag_lab.config import ExperimentConfig

    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    real = runs.write_jsonl

    def killed(path, rows):  # the process dies while writing predictions.jsonl
        real(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.write_run_folder(ExperimentConfig(name="x"), "default", "k" * 20, [{"id": 1}], {"all": {"n": 1}}, {})
    assert not (tmp_path / "results" / "runs" / "x" / ("k" * 12)).exists()
    assert list((tmp_path / "results" / "runs" / "x").iterdir()) == []  # and no temporary left behind


def test_orphan_temporaries_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    import os

    from rag_lab.io import TMP_MARK, clean_orphans

    dead = tmp_path / f".main_table.csv.{TMP_MARK}999999999.x1.tmp"
    dead_dir = tmp_path / "runs" / "e" / f".abc.{TMP_MARK}999999998.q"
    live = tmp_path / f".timings.csv.{TMP_MARK}{os.getpid()}.x2.tmp"
    dead_dir.mkdir(parents=True)
    dead.write_text("half")
    live.write_text("being written")
    assert sorted(clean_orphans(tmp_path)) == sorted([dead, dead_dir])
    assert live.exists() and not dead.exists() and not dead_dir.exists()


def test_a_run_cleans_what_a_killed_dense_encoding_left_in_the_retrieval_cache(tmp_path, monkeypatch):
    """Issue 22: a killed encoding's temporary folder stayed in cache/retrieval forever (only results/ and
    cache/runs were cleaned)."""
    from rag_lab.io import TMP_MARK
    from rag_lab.runner import run_experiment

    cfg = _tiny_env(tmp_path, monkeypatch)
    left = tmp_path / "cache" / "retrieval" / "emb-abc" / f".rows-0-100.{TMP_MARK}999999997.z"
    left.mkdir(parents=True)
    (left / "emb.npy").write_bytes(b"half an array")
    run_experiment(cfg, show_progress=False)
    assert not left.exists()


def _tiny_env(tmp_path, monkeypatch):
    """test_runner's tiny decoder, QA file and corpus in tmp_path, with caches and results there; its config."""
    import test_runner

    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_runner.QA))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_runner.CORPUS))
    test_runner.make_tiny_causal_lm(tmp_path / "model")
    return test_runner.config(tmp_path)


def test_the_leak_guard_holds_out_a_registered_benchmarks_shared_questions():
    """nq-mini keeps its published pools: the train split (NQ-open dev outside eval) shares nothing with eval by
    construction, while EfficientQA dev shares one question text with the train split. A run drawing from a pool
    that shares a question holds the copy out of the pool and lists it in leak_check.json."""
    from rag_lab.config import DataConfig
    from rag_lab.runner import leak_guard

    cfg = ExperimentConfig(data=DataConfig())
    questions, train, effqa = load_qa("nq-mini", "eval"), load_qa("nq-mini", "train"), load_qa("nq-mini", "efficientqa")
    kept, record = leak_guard(cfg, questions, train)
    assert kept == train and record["held_out_shared"] == [] and record["disjoint"]
    kept, record = leak_guard(cfg, train, effqa)  # e.g. a dev-split run on the train split drawing from efficientqa
    assert len(record["held_out_shared"]) == 1 and len(kept) == len(effqa) - 1 == record["train_pool_used"]
    assert record["disjoint"] and not {q.id for q in kept} & {q.id for q in train}


# ---------------------------------------------------------------- corrupt caches: reported, deleted, rebuilt — never used

def test_a_reordered_retrieval_cache_is_detected_and_retrieved_again(tmp_path):
    from rag_lab.data.records import Passage, QAExample
    from rag_lab.io import CacheRepaired
    from rag_lab.retrievers import BM25Retriever, cached_retrieve

    passages = [Passage(f"p{i}", t, f"{t} is a city in {c}") for i, (t, c) in enumerate(
        [("Paris", "France"), ("Berlin", "Germany"), ("Rome", "Italy"), ("Madrid", "Spain")])]
    questions = [QAExample("a", "city in france", ("Paris",)), QAExample("b", "city in italy", ("Rome",))]
    bm25 = BM25Retriever(passages, cache_dir=tmp_path, show_progress=False)
    first = cached_retrieve(bm25, questions, 2, tmp_path)
    (path,) = (tmp_path / "results").glob("*.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(reversed(lines)))  # hits now sit beside the wrong question
    with pytest.warns(CacheRepaired, match="checksum mismatch"):
        again = cached_retrieve(bm25, questions, 2, tmp_path)
    assert again == first and again[0][0].passage_id == "p0"


def test_a_zeroed_bm25_array_is_detected_and_the_index_rebuilt(tmp_path):
    import numpy as np

    from rag_lab.data.records import Passage, QAExample
    from rag_lab.io import CacheRepaired
    from rag_lab.retrievers import BM25Retriever

    passages = [Passage(f"p{i}", "", t) for i, t in enumerate(["red apples", "green pears", "blue plums"])]
    q = [QAExample("q", "green pears", ("pears",))]
    good = BM25Retriever(passages, cache_dir=tmp_path, show_progress=False).retrieve(q, 1)
    (folder,) = tmp_path.glob("bm25-*")
    array = next(folder.glob("*.npy"))
    np.save(array, np.zeros_like(np.load(array)))
    with pytest.warns(CacheRepaired, match="differs from rag_lab_manifest.json"):
        rebuilt = BM25Retriever(passages, cache_dir=tmp_path, show_progress=False)
    assert rebuilt.cache_hit is False and rebuilt.retrieve(q, 1) == good


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest-missing"])
def test_damaged_embeddings_and_faiss_index_are_rebuilt(tmp_path, damage):
    from test_retrievers import make_tiny_encoder

    from rag_lab.data.records import Passage
    from rag_lab.io import MANIFEST, CacheRepaired
    from rag_lab.retrievers import DenseRetriever

    encoder = make_tiny_encoder(tmp_path / "enc")
    passages = [Passage(f"p{i}", "", f"passage number {i} about topic {i % 3}") for i in range(12)]
    first = DenseRetriever(passages, encoder=encoder, cache_dir=tmp_path / "c", show_progress=False)
    before = np.array(first.embeddings)  # a copy: the retriever memory-maps the file about to be damaged
    for pattern in ("emb-*/rows-*/emb.npy", "faiss-*/index.faiss"):
        (path,) = (tmp_path / "c").glob(pattern)
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            path.write_bytes(data[:-8] + bytes(8))
        else:
            (path.parent / MANIFEST).unlink()
    with pytest.warns(CacheRepaired):
        again = DenseRetriever(passages, encoder=encoder, cache_dir=tmp_path / "c", show_progress=False)
    assert again.cache_hit == {"embeddings": False, "index": False}
    assert (again.embeddings == before).all()


def test_a_results_csv_keeps_names_that_pandas_would_read_as_missing(tmp_path):
    from rag_lab.reporting.results import load_table, upsert_rows

    path = tmp_path / "table.csv"
    for name in ("NA", "null", "None", "nan", "NA"):  # the last replaces the first
        upsert_rows(path, [{"experiment": name, "em": 0.5}], key=["experiment"])
    assert list(load_table(path)["experiment"]) == ["null", "None", "nan", "NA"]


def test_an_experiment_named_na_is_a_table_row_not_a_damaged_table(results, capsys):
    import shutil

    from rag_lab.reporting.results import upsert_main_table
    from rag_lab.reporting.runs import main_table_problem, rebuild_main_table, row_from_run_folder

    src = next((results / "runs" / "closed_book_zero_shot").iterdir())
    dst = results / "runs" / "NA" / src.name
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "name": "NA"}))
    upsert_main_table([row_from_run_folder(dst, "default")])
    assert main_table_problem() is None  # it used to read NA as an empty key cell and rebuild, forever
    assert "NA" in list(rebuild_main_table()["experiment"])


def test_rebuilding_the_main_table_never_leaves_it_missing(results):
    import threading

    from rag_lab.reporting.runs import rebuild_main_table

    path, done, missing = results / "main_table.csv", threading.Event(), []
    before = sorted(pd.read_csv(path)["experiment"])

    def rebuild():
        for _ in range(5):
            rebuild_main_table()
        done.set()

    def read():
        while not done.is_set():
            if not path.exists():
                missing.append(1)

    threads = [threading.Thread(target=rebuild), *(threading.Thread(target=read) for _ in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not missing and sorted(pd.read_csv(path)["experiment"]) == before


def test_check_config_checks_every_profile_a_file_declares(tmp_path, capsys):
    """Issue 22: `check-config` passed a file whose smoke profile had a typo (only default was loaded)."""
    path = tmp_path / "x.yaml"
    path.write_text("regime: closed_book\nprofiles:\n  smoke:\n    generator: {batchsize: 4}\n")
    code, out = run_cli(["check-config", str(path)], capsys)
    assert code == 2 and "unknown key 'generator.batchsize'" in out
    code, out = run_cli(["check-config", "--profile", "default", str(path)], capsys)
    assert code == 0 and "[default]" in out


def test_check_config_reads_a_retrieval_study_as_a_study(capsys):
    code, out = run_cli(["check-config", str(COMMITTED.parent / "experiments" / "retrieval.yaml")], capsys)
    assert code == 0 and "[smoke]" in out and "[extended]" in out and "(retrieval study)" in out


def _tiny_run_config(tmp_path) -> Path:
    import test_runner  # its tiny decoder, QA file and corpus

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_runner.QA))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_runner.CORPUS))
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "t0", "question": "who painted the wall", "answers": ["x"]}) + "\n")
    test_runner.make_tiny_causal_lm(tmp_path / "model")
    path = tmp_path / "mine.yaml"
    path.write_text(f"regime: rag\nretriever: {{kind: bm25, k: 2, stopwords: null, stemmer: null}}\n"
                    f"data: {{dataset: {tmp_path}/qa.jsonl, train_split: {tmp_path}/train.jsonl, corpus: {tmp_path}/corpus.jsonl}}\n"
                    f"generator: {{model: {tmp_path}/model, batch_size: 4, max_new_tokens: 3, use_chat_template: false}}\n")
    return path


def test_a_users_run_goes_to_results_user_and_records_its_overrides(tmp_path, capsys, monkeypatch):
    """Issue 22, item 6: `rag-lab run` wrote into the committed tables; `--set` did not exist."""
    from rag_lab import cli

    monkeypatch.delenv("RAG_LAB_RESULTS_DIR", raising=False)  # restored after the test, whatever the CLI sets
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path / "repo")
    path = _tiny_run_config(tmp_path)
    code, out = run_cli(["run", str(path), "--set", "retriever.k=1", "--set", "generator.max_new_tokens=2"], capsys)
    assert code == 0 and "results/user" in out, out
    user = tmp_path / "repo" / "results" / "user"
    (run,) = (user / "runs" / "mine").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["retriever"]["k"] == 1 and config["generator"]["max_new_tokens"] == 2
    assert (user / "main_table.csv").exists() and not (tmp_path / "repo" / "results" / "main_table.csv").exists()
    code, out = run_cli(["run", str(path), "--committed"], capsys)
    assert code == 0 and (tmp_path / "repo" / "results" / "main_table.csv").exists()
    code, out = run_cli(["run", str(path), "--set", "retriever.kk=1"], capsys)
    assert code == 2 and "unknown key 'retriever.kk'" in out and "--set retriever.kk=1" in out


def test_a_relative_dataset_path_is_read_beside_the_config_and_a_missing_file_is_never_a_hub_id(tmp_path, monkeypatch):
    """Issue 22, item 6: `data.dataset: data/my.jsonl` run from another folder went to the hub as a dataset id."""
    from rag_lab.data import load_qa

    folder = tmp_path / "exp"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "my.jsonl").write_text(json.dumps(Q) + "\n")
    (folder / "x.yaml").write_text("regime: closed_book\ndata: {dataset: data/my.jsonl}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_experiment(folder / "x.yaml")
    assert cfg.data.dataset == str(folder / "data" / "my.jsonl") and load_qa(cfg.data.dataset)[0].id == "q1"
    with pytest.raises(DataError, match="data.dataset data/other.jsonl: no such file"):
        load_qa("data/other.jsonl")


@pytest.mark.parametrize("settings, message", [
    ({"index_factory": "Flt"}, "retriever.index_factory 'Flt': FAISS rejects it over 32 dimensions (could not parse index string Flt)"),
    ({"index_factory": "IVF4,PQ7"}, "retriever.index_factory 'IVF4,PQ7': FAISS rejects it"),
    ({"index_factory": "IVF4,Flat", "search_params": "nprob=2"}, "retriever.search_params 'nprob=2': FAISS rejects it"),
])
def test_faiss_settings_are_refused_before_the_corpus_is_encoded(tmp_path, monkeypatch, settings, message):
    """Issue 22: a bad FAISS string failed with a traceback after the whole corpus was encoded."""
    from test_retrievers import make_tiny_encoder

    from rag_lab.data.records import Passage
    from rag_lab.io import UserError
    from rag_lab.retrievers import DenseRetriever

    encoder = make_tiny_encoder(tmp_path / "enc")
    passages = [Passage(f"p{i}", "", f"passage {i}") for i in range(8)]
    monkeypatch.setattr(DenseRetriever, "_load_or_encode", lambda self: pytest.fail("encoded before the check"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DenseRetriever(passages, encoder=encoder, cache_dir=tmp_path / "c", show_progress=False, **settings)


@pytest.mark.parametrize("settings, message", [
    ({"stemmer": "klingon"}, "retriever.stemmer 'klingon': unknown language"),
    ({"stopwords": "xx"}, "retriever.stopwords 'xx': xx not recognized"),
])
def test_bm25_stemmer_and_stopword_names_are_one_error_line(tmp_path, settings, message):
    from rag_lab.data.records import Passage
    from rag_lab.io import UserError
    from rag_lab.retrievers import BM25Retriever

    with pytest.raises(UserError, match=message):
        BM25Retriever([Passage("p0", "", "a passage")], cache_dir=tmp_path / "c", show_progress=False, **settings)



@pytest.mark.parametrize("body", [b"", b"\x00\xff\xfe not csv \x00" * 20, b'stage,wall_s\n"unclosed,1\n'])
def test_a_damaged_timings_csv_is_set_aside_and_started_again(tmp_path, body):
    """Issue 22: a corrupt timings.csv raised a traceback at the end of a finished run."""
    from rag_lab.io import CacheRepaired
    from rag_lab.reporting.results import load_table, upsert_rows

    path = tmp_path / "timings.csv"
    path.write_bytes(body)
    with pytest.warns(CacheRepaired, match="unreadable"):
        upsert_rows(path, [{"stage": "row x", "wall_s": 1.0}], key=["stage"])
    assert list(load_table(path)["stage"]) == ["row x"] and (tmp_path / "timings.csv.damaged").read_bytes() == body


def test_a_corrupt_generation_timing_file_keeps_the_cached_predictions(tmp_path, monkeypatch):
    from rag_lab.io import CacheRepaired
    from rag_lab.runner import run_experiment

    cfg = _tiny_env(tmp_path, monkeypatch)
    first = run_experiment(cfg, show_progress=False)
    (timing,) = (tmp_path / "cache" / "runs").glob("generate-*/timing.json")
    timing.write_text("{not json")
    with pytest.warns(CacheRepaired, match="timing.json: unreadable"):
        again = run_experiment(cfg, show_progress=False)
    assert (again.run_dir / "predictions.jsonl").read_bytes() == (first.run_dir / "predictions.jsonl").read_bytes()


@pytest.mark.parametrize("make, kind, message", [
    ("empty-folder", "decoder", r"is a folder but not a model \(no config.json\)"),
    ("decoder", "seq2seq", "is not an encoder-decoder model"),
])
def test_a_generator_folder_that_cannot_serve_the_config_is_one_error_before_retrieval(tmp_path, monkeypatch, make, kind, message):
    from rag_lab.io import UserError
    from rag_lab.runner import check_models
    from tiny_models import make_tiny_causal_lm

    folder = tmp_path / "model"
    folder.mkdir()
    if make == "decoder":
        make_tiny_causal_lm(folder)
    cfg = load_experiment(_write(tmp_path / "x.yaml", f"regime: closed_book\ngenerator: {{model: {folder}, kind: {kind}}}\n"))
    with pytest.raises(UserError, match=message):
        check_models(cfg)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("answers", [[""], ["the"], ["---", "a"]])
def test_a_question_whose_answers_cannot_be_scored_is_an_error_naming_its_line(tmp_path, answers):
    """Issue 22: `answers: [""]` or `["the"]` loaded, and every prediction scored 0 against it."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(Q) + "\n" + json.dumps(dict(Q, id="q2", answers=answers)) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: no answer survives SQuAD normalisation"):
        load_qa(str(path))


def test_nq_mini_keeps_its_two_unscoreable_pool_questions_as_published():
    from rag_lab.metrics import normalize_answer

    pool = load_qa("nq-mini", "train")
    assert len(pool) == 1210 and sum(not any(normalize_answer(a) for a in q.answers) for q in pool) == 2



@pytest.mark.parametrize("load, name, key", [(load_qa, "hf:nq_open", "data.dataset"),
                                             (load_corpus, "hf:wiki_dpr:psgs_w100.nq.exact", "data.corpus")])
def test_a_hub_dataset_that_cannot_be_reached_is_one_error_naming_the_key(load, name, key):
    """Issue 22, item 4: an `hf:` id with the hub offline was the hub client's traceback."""
    import os
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # conftest: nothing here may phone home
    with pytest.raises(DataError, match=f"{key} hub dataset .*: the hub cannot be reached"):
        load(name)
