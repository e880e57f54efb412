"""rag_lab.training.retriever: BM25 pair mining and dense-retriever fine-tuning.

Mining runs on a hand-built corpus whose answers we know; training runs a tiny random
BERT (built here, saved to tmp_path) for a few steps; the loss helper is compared with
a hand-written InfoNCE. One @slow test mines the real nq-mini train split.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rag_lab.data import Passage, QAExample
from rag_lab.metrics import has_answer
from rag_lab.models import load_sentence_encoder
from rag_lab.retrievers import BM25Retriever
from rag_lab.pipeline import contexts_from_hits
from rag_lab.training import TrainPair, contrastive_loss, mine_training_pairs
from rag_lab.training.retriever import fit_dense_retriever
from rag_lab.training.common import TRAINING_FILE
from rag_lab.training.retriever import _columns
from tiny_models import make_tiny_encoder

CORPUS = [
    Passage("p0", "France", "France is a country in western Europe with many old cities."),
    Passage("p1", "Paris", "Paris is the capital and largest city of France."),
    Passage("p2", "Germany", "Germany is a country in central Europe; its capital is Berlin."),
    Passage("p3", "Rhine", "The Rhine is a river that flows through Germany and the Netherlands."),
    Passage("p4", "Everest", "Mount Everest is the highest mountain on Earth, in the Himalayas."),
    Passage("p5", "Himalayas", "The Himalayas are a mountain range in Asia with many high peaks."),
    Passage("p6", "Danube", "The Danube is a long river in Europe; it flows into the Black Sea."),
]
QUESTIONS = [
    QAExample("q0", "what is the capital of france", ("Paris",)),
    QAExample("q1", "what is the capital of germany", ("Berlin",)),
    QAExample("q2", "what is the highest mountain on earth", ("Mount Everest", "Everest")),
    QAExample("q3", "where does the danube river flow into", ("the Black Sea",)),
    QAExample("q4", "who wrote the iliad", ("Homer",)),  # the answer is nowhere in CORPUS
]


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    return BM25Retriever(CORPUS, cache_dir=tmp_path_factory.mktemp("bm25"), show_progress=False)


# ----------------------------------------------------------------------------- mining


def ranked(bm25, questions, depth):
    """Each question's BM25 top-`depth` passages, best first (what `pipeline.contexts` returns)."""
    return contexts_from_hits(bm25.retrieve(questions, depth), CORPUS)


def test_mining_positives_have_answers_negatives_do_not(bm25):
    pairs, stats = mine_training_pairs(QUESTIONS, ranked(bm25, QUESTIONS, 10), n_hard_negatives=1)
    assert stats == {"n_questions": 5, "n_pairs": 4, "skipped_no_positive": 1, "skipped_no_negative": 0,
                     "depth": 7, "n_hard_negatives": 1}  # the deepest ranking: 7 passages in all
    by_q = {p.question_id: p for p in pairs}
    assert set(by_q) == {"q0", "q1", "q2", "q3"}  # q4 (Homer) is skipped, not a crash
    assert by_q["q0"].positive_id == "p1" and by_q["q1"].positive_id == "p2"
    assert by_q["q0"].positive == "Paris. Paris is the capital and largest city of France."  # title. text
    answers = {q.id: q.answers for q in QUESTIONS}
    for pair in pairs:  # the reference test: has_answer on the raw texts
        assert len(pair.negatives) == len(pair.negative_ids) == 1 and pair.positive_id not in pair.negative_ids
        assert has_answer(answers[pair.question_id], pair.positive)
        assert not any(has_answer(answers[pair.question_id], n) for n in pair.negatives)


def test_mining_takes_highest_ranked_without_answer_as_negative(bm25):
    pairs, _ = mine_training_pairs(QUESTIONS[:1], ranked(bm25, QUESTIONS[:1], 10), n_hard_negatives=2)
    ranking = [h.passage_id for h in bm25.retrieve(QUESTIONS[:1], 10)[0]]
    without_answer = [pid for pid in ranking if pid not in ("p1",)]  # only p1 mentions Paris
    assert pairs[0].negative_ids == tuple(without_answer[:2])


def test_mining_is_deterministic_and_counts_short_rankings(bm25):
    first = mine_training_pairs(QUESTIONS, ranked(bm25, QUESTIONS, 10), n_hard_negatives=1)
    assert first == mine_training_pairs(QUESTIONS, ranked(bm25, QUESTIONS, 10), n_hard_negatives=1)
    # 7 passages in all: at most 6 can be negatives, so asking for 7 skips every question
    _, stats = mine_training_pairs(QUESTIONS, ranked(bm25, QUESTIONS, 10), n_hard_negatives=7)
    assert stats["n_pairs"] == 0 and stats["skipped_no_negative"] == 4 and stats["skipped_no_positive"] == 1
    pairs, _ = mine_training_pairs(QUESTIONS, ranked(bm25, QUESTIONS, 10), n_hard_negatives=0)
    assert all(p.negatives == () for p in pairs)


def test_mining_needs_one_ranking_per_question(bm25):
    with pytest.raises(ValueError, match="4 questions but 1 contexts"):
        mine_training_pairs(QUESTIONS[:4], ranked(bm25, QUESTIONS[:1], 10))


def test_columns_name_negatives_for_mnrl():
    pair = TrainPair("q", "pos", ("n1", "n2"))
    assert list(_columns([pair])) == ["anchor", "positive", "negative_1", "negative_2"]
    assert _columns([pair], "query: ", "passage: ")["negative_2"] == ["passage: n2"]
    assert list(_columns([TrainPair("q", "pos", ("n",))])) == ["anchor", "positive", "negative"]
    with pytest.raises(ValueError, match="same number of negatives"):
        _columns([pair, TrainPair("q", "pos", ("n",))])


# ----------------------------------------------------------------------------- a tiny encoder

FACTS = [  # (subject, question word, answer word): 16 distinct synthetic pairs
    (s, a) for s, a in zip("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
                           "november oscar papa".split(),
                           "red blue green amber ivory olive coral azure lemon peach plum mint jade rose sand teal".split())
]


def synthetic_pairs() -> list[TrainPair]:
    return [TrainPair(f"what colour is {s}", f"{s} is painted {a}", (f"{FACTS[(i + 1) % len(FACTS)][0]} is round",))
            for i, (s, a) in enumerate(FACTS)]


@pytest.fixture
def tiny_encoder(tmp_path):
    pairs = synthetic_pairs()
    texts = [t for p in pairs for t in (p.question, p.positive, *p.negatives)]
    return make_tiny_encoder(tmp_path / "tiny-bert", texts)


def test_contrastive_loss_matches_reference_infonce(tiny_encoder):
    model = load_sentence_encoder(str(tiny_encoder))
    pairs = synthetic_pairs()[:6]
    q, p, n = (model.encode(texts, convert_to_tensor=True) for texts in _columns(pairs).values())
    # query i must pick passage i among all positives and all hard negatives of the batch (scale 20)
    scores = 20 * F.cosine_similarity(q[:, None], torch.cat([p, n])[None], dim=-1)
    reference = F.cross_entropy(scores, torch.arange(len(pairs))).item()
    assert contrastive_loss(model, pairs, batch_size=6) == pytest.approx(reference, rel=1e-4)
    # batches of 3: the mean of the two batch losses, weighted by size
    halves = [contrastive_loss(model, pairs[i:i + 3], batch_size=3) for i in (0, 3)]
    assert contrastive_loss(model, pairs, batch_size=3) == pytest.approx(np.mean(halves), rel=1e-6)


def test_training_lowers_the_loss_and_saves_a_loadable_encoder(tiny_encoder, tmp_path):
    pairs = synthetic_pairs()
    out = tmp_path / "trained"
    report = fit_dense_retriever(str(tiny_encoder), pairs, out, epochs=2, batch_size=8, learning_rate=1e-3,
                                   warmup_ratio=0.0, max_length=32, logging_steps=1)
    assert report["steps"] == 4 and report["n_pairs"] == 16
    assert report["loss_after"] < report["loss_before"]
    assert [e["step"] for e in report["loss_history"]] == [1, 2, 3, 4]
    assert json.loads((out / TRAINING_FILE).read_text())["loss_after"] == report["loss_after"]

    model = load_sentence_encoder(str(out))  # as `retriever.encoder: <out>` would load it
    vecs = model.encode(["what colour is alpha", "alpha is painted red"])
    assert vecs.shape == (2, 32) and np.isfinite(vecs).all()
    assert contrastive_loss(model, pairs, batch_size=8) == pytest.approx(report["loss_after"], rel=1e-4)
    assert not list(tmp_path.glob(".trained.*"))  # the temp folder was renamed into place


def test_training_refuses_bad_arguments(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="at least one pair"):
        fit_dense_retriever(str(tiny_encoder), [], tmp_path / "x")
    with pytest.raises(ValueError, match="warmup_ratio"):
        fit_dense_retriever(str(tiny_encoder), synthetic_pairs(), tmp_path / "x", warmup_ratio=5)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_mining_on_nq_mini_train(tmp_path):
    from rag_lab.data import load_corpus, load_qa

    questions, passages = load_qa("nq-mini", "train"), load_corpus("nq-mini")
    bm25 = BM25Retriever(passages, cache_dir=tmp_path, show_progress=False)
    pairs, stats = mine_training_pairs(questions, contexts_from_hits(bm25.retrieve(questions, 100), passages))
    print(stats)
    assert stats["n_questions"] == len(questions) == 1210
    assert stats["n_pairs"] > 300 and stats["skipped_no_positive"] > 0
    assert stats["n_pairs"] + stats["skipped_no_positive"] + stats["skipped_no_negative"] == 1210
