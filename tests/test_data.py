"""Data layer: records, loaders and their errors, chunking, corpus coverage, the nq-mini build."""
import gzip
import json
import os

import pytest

from rag_lab.data import DATASETS, load_corpus, load_qa
from rag_lab.data import build_nq_mini, nq_sources
from rag_lab.data.chunking import article_to_passages, chunk_words
from rag_lab.data.coverage import AnswerOccurrenceIndex
from rag_lab.data.corpus import file_corpus as load_corpus_file
from rag_lab.data.loaders import load_qa_file
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError, atomic_write_text, read_jsonl, sha256_file
from rag_lab.metrics import AnswerInPassage, gold_spans, has_answer, has_answer_normalized, padded_normalized
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
    path = write_lines(tmp_path / "qa.jsonl", ['{"question": "ok", "answers": ["yes"]}', line])
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
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "q", "answers": ["yes"]}'])
    assert load_qa(str(path))[0].answers == ("yes",)
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
    effqa = load_qa("nq-mini", "efficientqa")
    assert (len(train), len(eval_), len(effqa), len(corpus)) == (1210, 2400, 1800, s["n_passages"])
    assert s["n_passages"] == s["n_vital_passages"] + s["n_gold_passages"] + s["n_extract_passages"]
    assert len(load_corpus("nq-mini-vital")) == s["n_vital_passages"] == 12324  # NQ-mini 1's corpus, unchanged
    # the passages cut here are <= 100 words; the gold passages are kept as given (some longer)
    cut = corpus.select(list(range(s["n_vital_passages"])) + list(range(s["n_vital_passages"] + s["n_gold_passages"], len(corpus))))
    assert max(len(p.text.split()) for p in cut) <= 100
    assert {e.id for e in train}.isdisjoint(e.id for e in eval_)
    assert {e.question for e in train}.isdisjoint({e.question for e in eval_} | {e.question for e in effqa})
    assert len(train) + len(eval_) == 3610 and {e.id for e in train + eval_} == {f"nq-dev-{i}" for i in range(3610)}
    assert sum(e.answer_in_corpus for e in eval_) == s["eval_answer_in_corpus"]
    # every gold passage id names a corpus passage, and the split keeps the gold-passage rate
    gold = [e.gold_passage_id for e in train + eval_ if e.gold_passage_id]
    assert len(gold) == 2655 and len(corpus.rows_of(gold)) == 2655
    rate = {name: sum(bool(e.gold_passage_id) for e in qs) / len(qs) for name, qs in (("train", train), ("eval", eval_))}
    assert abs(rate["train"] - rate["eval"]) < 0.002, rate


def test_gold_passages_hold_the_answer_almost_always():
    """The NQ-annotated passage contains a gold answer for 99.3% of the 2,655 (../shared/data/README.md)."""
    corpus, holds = load_corpus("nq-mini"), AnswerInPassage()
    qs = [e for e in load_qa("nq-mini", "train") + load_qa("nq-mini", "eval") if e.gold_passage_id]
    passages = corpus.take(corpus.rows_of([e.gold_passage_id for e in qs]))
    share = sum(holds(e.answers, p) for e, p in zip(qs, passages)) / len(qs)
    assert 0.99 <= share <= 0.995, share


def test_answer_in_corpus_flags_agree_with_has_answer():
    corpus = load_corpus("nq-mini")
    texts = [padded_normalized(f"{p.title} {p.text}") for p in corpus]  # has_answer's test, each text normalised once
    for ex in load_qa("nq-mini", "eval")[:25]:  # brute force over the whole corpus: slow, so a sample
        golds = gold_spans(ex.answers)
        assert ex.answer_in_corpus == any(has_answer_normalized(golds, t) for t in texts), ex.id


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
        f.write('{"id": "x", "question": "q", "answers": ["yes"]}\n')
    with pytest.raises(DataError, match="eval.jsonl: sha256 differs"):
        build_nq_mini.validate(out)


def test_eval_set_name_names_the_seed_only_for_a_subset():
    from rag_lab.config import DataConfig
    from rag_lab.data.subsets import eval_set_name

    assert eval_set_name(DataConfig(n_eval=300, subset_seed=7), 300) == "nq-mini/eval n=300 seed=7"
    assert eval_set_name(DataConfig(), 3610) == "nq-mini/eval n=3610"
    # the name distinguishes question sets that rows must never be paired across
    assert eval_set_name(DataConfig(n_eval=300, subset_seed=0), 300) != eval_set_name(DataConfig(n_eval=300, subset_seed=1), 300)


# ---------------------------------------------------------------- NQ-mini 2's sources: bad input

def _sources(tmp_path):
    """A copy of ../shared/data the test may damage (the large files linked, not copied)."""
    import shutil

    src, dst = source_data_dir(), tmp_path / "src"
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _replace(path, data: bytes):
    path.unlink()
    path.write_bytes(data)


needs_sources = pytest.mark.skipif(not (source_data_dir() / "nq_open").exists(), reason="raw sources (../shared/data) not beside the repo")


@needs_sources
@pytest.mark.parametrize("damage, message", [
    ("missing_gold", r"nq-open-oracle.jsonl.gz: source file missing"),
    ("wrong_sha_gold", r"nq-open-oracle.jsonl.gz: sha256 differs from the pinned"),
    ("missing_extract", r"wiki_05.gz: source file missing"),
    ("wrong_sha_extract", r"wiki_05.gz: sha256 of the uncompressed file differs"),
])
def test_build_refuses_damaged_sources(tmp_path, damage, message):
    src = _sources(tmp_path)
    gold, extract = src / nq_sources.GOLD[0], src / nq_sources.EXTRACT_DIR / "wiki_05.gz"
    if damage == "missing_gold":
        gold.unlink()
    elif damage == "wrong_sha_gold":
        _replace(gold, gzip.compress(b'{"question": "x"}\n', mtime=0))
    elif damage == "missing_extract":
        extract.unlink()
    else:
        _replace(extract, gzip.compress(b"<doc id=\"1\" url=\"?curid=1\" title=\"A\">\nA\nText.\n</doc>\n", mtime=0))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        build_nq_mini.ensure(out, rebuild=True, source=src)
    assert not out.exists()  # nothing half-written


def _extract_file(tmp_path, text: str):
    raw = text.encode("utf-8")
    path = tmp_path / "wiki_99.gz"
    path.write_bytes(gzip.compress(raw, mtime=0))
    import hashlib

    return path, hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("text, message", [
    ('<doc id="1" url="?curid=1" title="A">\nA\nbody\n', r"wiki_99.gz:1: <doc> block is never closed"),
    ('<doc id="1" url="?curid=1" title="A">\nA\n<doc id="2" url="?curid=2" title="B">\n</doc>\n', r"wiki_99.gz:3: a new <doc> opens"),
    ('stray text\n', r"wiki_99.gz:1: expected a '<doc id="),
    ('<doc id="1" title="A">\nA\n</doc>\n', r"wiki_99.gz:1: expected a '<doc id="),
])
def test_malformed_wikiextractor_blocks_name_file_and_line(tmp_path, text, message):
    path, sha = _extract_file(tmp_path, text)
    with pytest.raises(DataError, match=message):
        list(nq_sources.read_extract_file(path, sha))


def test_extract_file_drops_the_repeated_title_and_joins_lines(tmp_path):
    path, sha = _extract_file(tmp_path, '<doc id="7" url="?curid=7" title="Jarred Shaw">\nJarred Shaw\n\nFirst line.\nSecond.\n</doc>\n'
                                        '<doc id="8" url="?curid=8" title="Empty">\nEmpty\n\n</doc>\n')
    assert list(nq_sources.read_extract_file(path, sha)) == [(1, "7", "Jarred Shaw", "First line. Second."), (7, "8", "Empty", "")]


@needs_sources
def test_gold_line_that_matches_no_question_names_its_line(tmp_path):
    src = _sources(tmp_path)
    gold = src / nq_sources.GOLD[0]
    lines = gzip.decompress(gold.read_bytes()).decode("utf-8").splitlines()
    lines[4] = json.dumps({**json.loads(lines[4]), "question": "a question nobody asked"})
    _replace(gold, gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))
    qs = nq_sources._read_nq(src / nq_sources.NQ_DEV[0], nq_sources.NQ_DEV[1], "nq-dev")
    import hashlib

    monkey_sha = hashlib.sha256(gold.read_bytes()).hexdigest()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nq_sources, "GOLD", (nq_sources.GOLD[0], monkey_sha))  # past the hash check, to the line check
        with pytest.raises(DataError, match=r"nq-open-oracle.jsonl.gz:5: question 'a question nobody asked' matches no NQ-open dev question"):
            nq_sources.read_gold(src, qs)


def test_duplicate_passage_ids_after_chunking_are_an_error():
    corpus = [Passage("A#0", "A", "x"), Passage("B#0", "B", "y"), Passage("A#0", "A", "z")]
    with pytest.raises(DataError, match=r"passage id 'A#0' is given twice \(passages 0 and 2\)"):
        build_nq_mini.check_unique_ids(corpus, "sources")


def test_gold_passages_merge_by_identical_text_and_split_is_stratified():
    q = [QAExample(f"q{i}", f"question {i}", ("a",)) for i in range(4)]
    corpus = [Passage("T#0", "T", "known text")]
    added, ids = build_nq_mini.merge_gold(corpus, [(q[0], Passage("", "T", "known text")), (q[1], Passage("", "U", "new")),
                                                   (q[2], Passage("", "U", "new"))])
    assert added == [Passage("U#gold0", "U", "new")] and ids == {"q0": "T#0", "q1": "U#gold0", "q2": "U#gold0"}
    many = [QAExample(f"q{i}", f"question {i}", ("a",), gold_passage_id="p" if i % 4 else None) for i in range(400)]
    eval_, pool = build_nq_mini.stratified_split(many, 300, seed=0)
    assert len(eval_) == 300 and len(pool) == 100 and {e.id for e in eval_}.isdisjoint(e.id for e in pool)
    assert sum(bool(e.gold_passage_id) for e in eval_) == 225 and sum(bool(e.gold_passage_id) for e in pool) == 75
    assert build_nq_mini.stratified_split(many, 300, seed=0) == (eval_, pool)  # seeded
