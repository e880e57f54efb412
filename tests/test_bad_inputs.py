"""Bad inputs, table-driven: each case states the input and what must happen — an error whose
message names the file/line or key (a fragment of it is asserted), or a documented repair — and
that nothing under results/ changed when it is an error. (Issue 13's suite; it grows with each fix.)"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    Case("literal-unknown-backend", text("x.yaml", "regime: closed_book\ngenerator: {backend: vllm}\n"), experiment,
         ConfigError, "'generator.backend' = 'vllm'"),
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
    Case("study-ks-past-depth", text("r.yaml", "depth: 5\nks: [1, 10]\nretrievers: {bm25: {kind: bm25}}\n"), study,
         ConfigError, "ks must be positive and <= depth (5)"),
    Case("study-duplicate-retriever", text("r.yaml", "retrievers:\n  bm25: {kind: bm25}\n  bm25: {kind: dense}\n"),
         study, ConfigError, "r.yaml:3: duplicate key 'bm25'"),
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
