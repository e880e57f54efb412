"""pipeline.contexts: the one function that turns a retriever config, questions and passages into
the passages each question's reader sees — cached, and keyed on content."""
from __future__ import annotations

import pytest

from rag_lab import pipeline
from rag_lab.config import RetrieverConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.retrievers import BM25Retriever

CORPUS = [
    Passage("p0", "France", "France is a country in western Europe; its capital is Paris."),
    Passage("p1", "Germany", "Germany is a country in central Europe; its capital is Berlin."),
    Passage("p2", "Everest", "Mount Everest is the highest mountain on Earth."),
    Passage("p3", "Danube", "The Danube is a long river that flows into the Black Sea."),
]
TRAIN = [QAExample("t0", "what is the capital of france", ("Paris",)),
         QAExample("t1", "which is the highest mountain", ("Everest",))]
DEV = [QAExample("d0", "where does the danube flow", ("the Black Sea",))]
BM25 = RetrieverConfig(kind="bm25", k=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_contexts_are_the_retrievers_top_k_passages_per_question_set(cache):
    train, dev = pipeline.contexts(BM25, CORPUS, 2, TRAIN, DEV, show_progress=False)
    direct = BM25Retriever(CORPUS, cache_dir=cache / "elsewhere", show_progress=False)
    for ctx, questions in ((train, TRAIN), (dev, DEV)):
        hits = direct.retrieve(questions, 2)
        assert ctx.ids() == [[h.passage_id for h in row] for row in hits]
        assert [[p.id for p in row] for row in ctx.passages] == ctx.ids() and all(len(row) == 2 for row in ctx.passages)
    assert train.passages[0][0] == CORPUS[0] and dev.passages[0][0] == CORPUS[3]
    (empty,) = pipeline.contexts(BM25, CORPUS, 2, [], show_progress=False)
    assert empty.hits == [] and empty.passages == []


def test_contexts_come_from_the_cache_under_the_one_cache_root(cache, monkeypatch):
    first = pipeline.contexts(BM25, CORPUS, 2, TRAIN, show_progress=False)
    assert list((cache / "retrieval" / "results").glob("*.jsonl"))  # paths.cache_dir("retrieval")
    monkeypatch.setattr(BM25Retriever, "retrieve", lambda *a, **k: pytest.fail("retrieved again instead of reading the cache"))
    assert pipeline.contexts(BM25, CORPUS, 2, TRAIN, show_progress=False) == first


def test_contexts_are_keyed_on_passage_text_not_ids(cache):
    """The same ids with another text are another corpus: new index, new hits, the new text."""
    (before,) = pipeline.contexts(BM25, CORPUS, 1, DEV, show_progress=False)
    edited = [CORPUS[0], CORPUS[1], CORPUS[2], Passage("p3", "Danube", "The Danube is a river in Europe.")]
    edited.append(Passage("p4", "Black Sea", "The Danube flows into the Black Sea, which the danube feeds."))
    (after,) = pipeline.contexts(BM25, edited, 1, DEV, show_progress=False)
    assert before.ids() == [["p3"]] and after.ids() == [["p4"]]
    (again,) = pipeline.contexts(BM25, edited[:4], 1, DEV, show_progress=False)
    assert again.passages[0][0].text == "The Danube is a river in Europe."


def test_contexts_reject_a_retriever_that_is_not_one(cache):
    with pytest.raises(ValueError, match="builds no retriever"):
        pipeline.contexts(RetrieverConfig(kind="none"), CORPUS, 1, TRAIN, show_progress=False)
