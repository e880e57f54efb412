"""Data layer: records, loaders and their errors, chunking, corpus coverage, the nq-mini build."""
import gzip
import json

import pytest

from rag_lab.data import DATASETS, load_corpus, load_qa
from rag_lab.data import build_nq_mini
from rag_lab.data.chunking import article_to_passages, chunk_words
from rag_lab.data.coverage import AnswerOccurrenceIndex
from rag_lab.data.corpus import file_corpus as load_corpus_file
from rag_lab.data.loaders import load_qa_file
from rag_lab.io import DataError, atomic_write_text, read_jsonl, sha256_file
from rag_lab.metrics import has_answer
from rag_lab.paths import source_data_dir


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- loaders

def test_qa_jsonl_accepts_answer_or_answers_and_assigns_ids(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [
        '{"question": "who wrote hamlet", "answer": ["Shakespeare"]}',
        '',
        '{"id": "x", "question": "capital of france", "answers": ["Paris", "paris, france"]}',
    ])
    a, b = load_qa_file(path)
    assert (a.id, a.answers) == ("qa-0", ("Shakespeare",))
    assert (b.id, b.question, b.answers) == ("x", "capital of france", ("Paris", "paris, france"))


def test_qa_json_and_parquet(tmp_path):
    import pandas as pd

    rows = [{"id": "a", "question": "q1", "answers": ["x"]}, {"id": "b", "question": "q2", "answers": ["y", "z"]}]
    (tmp_path / "qa.json").write_text(json.dumps({"data": rows}))
    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    for name in ("qa.json", "qa.parquet"):
        loaded = load_qa_file(tmp_path / name)
        assert [(e.id, e.answers) for e in loaded] == [("a", ("x",)), ("b", ("y", "z"))]


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answers": ["a"', "qa.jsonl:2: malformed JSON"),
    ('{"answers": ["a"]}', "qa.jsonl:2: QA row has no 'question'"),
    ('{"question": "q"}', "qa.jsonl:2: QA row has no 'answers'"),
    ('{"question": "q", "answers": []}', "qa.jsonl:2: QA row has an empty answers list"),
    ('["not", "an", "object"]', "qa.jsonl:2: expected a JSON object"),
])
def test_bad_qa_rows_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "qa.jsonl", ['{"question": "ok", "answers": ["a"]}', line])
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        load_qa_file(path)


def test_corpus_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    good = '{"id": "p1", "title": "T", "text": "some text"}'
    with pytest.raises(DataError, match=r"corpus.jsonl:2: corpus row has no 'text'"):
        load_corpus_file(write_lines(tmp_path / "corpus.jsonl", [good, '{"id": "p2", "title": "T"}']))
    with pytest.raises(DataError, match=r"duplicate passage id 'p1'"):
        load_corpus_file(write_lines(tmp_path / "corpus.jsonl", [good, good]))
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus_file(write_lines(tmp_path / "corpus.jsonl", [""]))
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress((good + "\n").encode()))
    assert load_corpus_file(gz)[0].text == "some text"


def test_resolver_names_paths_and_unknown(tmp_path):
    assert "nq-mini" in DATASETS
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "q", "answers": ["a"]}'])
    assert load_qa(str(path))[0].answers == ("a",)
    with pytest.raises(DataError, match=r"unknown dataset 'nq-mni'.*nq-mini"):
        load_qa("nq-mni")
    with pytest.raises(DataError, match=r"unknown corpus 'wiki'"):
        load_corpus("wiki")
    with pytest.raises(DataError, match="has no split 'test'"):
        load_qa("nq-mini", "test")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("rag_lab.io.os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind


# ---------------------------------------------------------------- chunking and coverage

def test_chunking_is_balanced_and_bounded():
    text = " ".join(f"w{i}" for i in range(230))
    chunks = chunk_words(text, 100)
    assert [len(c.split()) for c in chunks] == [77, 77, 76]
    assert " ".join(chunks) == text
    assert chunk_words("", 100) == []
    passages = article_to_passages("Eiffel Tower", "a " * 150)
    assert [p.id for p in passages] == ["Eiffel Tower#0", "Eiffel Tower#1"]
    assert all(p.title == "Eiffel Tower" for p in passages)


def test_answer_occurrence_index_matches_has_answer():
    texts = ["The Eiffel Tower was completed in 1889.", "Paris is the capital of France.", "born 1889-03-31"]
    index = AnswerOccurrenceIndex(texts)
    cases = ["1889", "capital of France", "Eiffel tower", "188", "France Paris", "the", "", "31"]
    for answer in cases:
        expected = any(has_answer([answer], t) for t in texts)
        assert index.contains(answer) == expected, answer
    # a span must not run across two passages
    assert not AnswerOccurrenceIndex(["ends with tower", "completed in"]).contains("tower completed")


# ---------------------------------------------------------------- the built benchmark

def test_committed_nq_mini_is_valid_and_loads():
    manifest = build_nq_mini.validate()
    train, eval_ = load_qa("nq-mini", "train"), load_qa("nq-mini", "eval")
    corpus = load_corpus("nq-mini")
    s = manifest["summary"]
    assert (len(train), len(eval_), len(corpus)) == (1800, 3610, s["n_passages"])
    assert len({p.title for p in corpus}) == 10033
    assert max(len(p.text.split()) for p in corpus) <= 100
    assert eval_[0].id == "nq-dev-0" and eval_[0].answers == ("14 December 1972 UTC", "December 1972")
    assert sum(e.answer_in_corpus for e in eval_) == s["eval_answer_in_corpus"]
    assert not {e.question for e in train} & {e.question for e in eval_}  # train and eval are disjoint


def test_answer_in_corpus_flags_agree_with_has_answer():
    corpus = load_corpus("nq-mini")
    texts = [f"{p.title} {p.text}" for p in corpus]
    for ex in load_qa("nq-mini", "eval")[:25]:  # brute force over the whole corpus: slow, so a sample
        assert ex.answer_in_corpus == any(has_answer(ex.answers, t) for t in texts), ex.id


@pytest.mark.skipif(not (source_data_dir() / "nq_open").exists(), reason="raw sources (../shared/data) not beside the repo")
def test_build_is_byte_reproducible(tmp_path):
    first = build_nq_mini.write(build_nq_mini.build(), tmp_path / "a")
    second = build_nq_mini.write(build_nq_mini.build(), tmp_path / "b")
    committed = build_nq_mini.validate()
    assert first["files"] == second["files"] == committed["files"]
    assert (tmp_path / "a" / "PROVENANCE.md").read_text() == (build_nq_mini.data_dir() / "nq_mini" / "PROVENANCE.md").read_text()


def test_validate_detects_tampering(tmp_path):
    out = tmp_path / "nq_mini"
    import shutil

    shutil.copytree(build_nq_mini.data_dir() / "nq_mini", out)
    build_nq_mini.validate(out)
    with open(out / "eval.jsonl", "a") as f:
        f.write('{"id": "x", "question": "q", "answers": ["a"]}\n')
    with pytest.raises(DataError, match="eval.jsonl: sha256 differs"):
        build_nq_mini.validate(out)


def test_eval_set_name_names_the_seed_only_for_a_subset():
    from rag_lab.config import DataConfig
    from rag_lab.data.subsets import eval_set_name

    assert eval_set_name(DataConfig(n_eval=300, subset_seed=7), 300) == "nq-mini/eval n=300 seed=7"
    assert eval_set_name(DataConfig(), 3610) == "nq-mini/eval n=3610"
    # the name distinguishes question sets that rows must never be paired across
    assert eval_set_name(DataConfig(n_eval=300, subset_seed=0), 300) != eval_set_name(DataConfig(n_eval=300, subset_seed=1), 300)
