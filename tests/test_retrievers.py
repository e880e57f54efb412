"""Retrievers on a tiny corpus: BM25, dense (tiny random encoder + FAISS), hybrid fusion, caches, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError
from rag_lab.pipeline import Contexts, contexts_from_hits
from rag_lab.studies.retrieval_eval import evaluate_contexts, recall_row
from rag_lab.retrievers import BM25Retriever, DenseRetriever, HybridRetriever, Hit, build_faiss_index, cached_retrieve, rrf_fuse, weighted_fuse
from tiny_models import make_tiny_tokenizer

PASSAGES = [
    Passage("Paris#0", "Paris", "Paris is the capital city of France"),
    Passage("Berlin#0", "Berlin", "Berlin is the capital city of Germany"),
    Passage("Rhine#0", "Rhine", "The Rhine river flows through Germany and France"),
    Passage("Alps#0", "Alps", "The Alps mountain range"),
    Passage("Louis XIV#0", "Louis XIV", "Louis XIV was king of France, born in the year 1638"),
    Passage("Seine#0", "Seine", "The Seine river flows through Paris"),
]
Q = [QAExample("q0", "what is the capital of France", ("Paris",)),
     QAExample("q1", "which river flows through Paris", ("Seine",)),
     QAExample("q2", "who was king of France", ("Louis XIV",))]


def make_tiny_encoder(path, seed=0):
    """A 2-layer random BERT with mean pooling, saved where SentenceTransformer can load it."""
    from transformers import BertConfig, BertModel

    tokenizer = make_tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def encoder(tmp_path):
    return make_tiny_encoder(tmp_path / "encoder")


# ---------------------------------------------------------------- BM25

def test_bm25_ranks_the_matching_passage_first(tmp_path):
    bm25 = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    hits = bm25.retrieve(Q, k=2)
    assert [h[0].passage_id for h in hits] == ["Paris#0", "Seine#0", "Louis XIV#0"]
    assert all([x.rank for x in h] == [1, 2] and h[0].score >= h[1].score for h in hits)


def test_k_beyond_corpus_returns_every_passage_ranked(tmp_path):
    hits = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False).retrieve(Q[:1], k=50)[0]
    assert sorted(h.passage_id for h in hits) == sorted(p.id for p in PASSAGES)
    assert [h.rank for h in hits] == list(range(1, len(PASSAGES) + 1))


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_bad_k_is_an_error(tmp_path, k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False).retrieve(Q, k=k)


def test_empty_question_names_its_id(tmp_path):
    bm25 = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    with pytest.raises(DataError, match="question 'q-empty' is empty"):
        bm25.retrieve([Q[0], QAExample("q-empty", "  ", ("x",))], k=2)


def test_bm25_index_cache_hit_and_invalidation(tmp_path):
    first = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    again = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert again.retrieve(Q, 3) == first.retrieve(Q, 3)
    changed = PASSAGES[:-1] + [Passage("Seine#0", "Seine", "The Seine is a river in northern France")]
    assert BM25Retriever(changed, cache_dir=tmp_path, show_progress=False).cache_hit is False
    assert BM25Retriever(PASSAGES, k1=1.2, cache_dir=tmp_path, show_progress=False).cache_hit is False


# ---------------------------------------------------------------- dense

def test_dense_matches_brute_force(tmp_path, encoder):
    dense = DenseRetriever(PASSAGES, encoder=encoder, cache_dir=tmp_path, show_progress=False)
    hits = dense.retrieve(Q, k=3)
    queries = dense.encode([q.question for q in Q])
    scores = queries @ dense.embeddings.T
    position = {p.id: i for i, p in enumerate(PASSAGES)}
    for row, h in zip(scores, hits):
        # the top-3 scores equal brute force's, and each hit carries its passage's own score (ties may swap ids)
        np.testing.assert_allclose([x.score for x in h], np.sort(row)[::-1][:3], rtol=1e-5)
        np.testing.assert_allclose([x.score for x in h], [row[position[x.passage_id]] for x in h], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dense.embeddings, axis=1), 1.0, rtol=1e-5)


def test_dense_cache_hit_and_invalidation(tmp_path, encoder):
    DenseRetriever(PASSAGES, encoder=encoder, cache_dir=tmp_path, show_progress=False)
    again = DenseRetriever(PASSAGES, encoder=encoder, cache_dir=tmp_path, show_progress=False)
    assert again.cache_hit == {"embeddings": True, "index": True}
    other_encoder = make_tiny_encoder(tmp_path / "encoder2", seed=1)
    assert DenseRetriever(PASSAGES, encoder=other_encoder, cache_dir=tmp_path, show_progress=False).cache_hit["embeddings"] is False
    assert DenseRetriever(PASSAGES[:4], encoder=encoder, cache_dir=tmp_path, show_progress=False).cache_hit["embeddings"] is False
    # retraining into the same folder changes the weights: the cache must not be reused
    make_tiny_encoder(encoder, seed=2)
    assert DenseRetriever(PASSAGES, encoder=encoder, cache_dir=tmp_path, show_progress=False).cache_hit["embeddings"] is False
    # a new index type over the same embeddings reuses the embeddings only
    hnsw = DenseRetriever(PASSAGES, encoder=encoder, index_factory="HNSW8", cache_dir=tmp_path, show_progress=False)
    assert hnsw.cache_hit == {"embeddings": True, "index": False}


def test_faiss_factories():
    vecs = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    flat = build_faiss_index(vecs, "Flat")
    for factory in ("HNSW16", "IVF4,Flat"):
        index = build_faiss_index(vecs, factory)
        assert index.ntotal == 64
        if factory.startswith("IVF"):
            index.nprobe = 4  # all lists: exact
            assert (index.search(vecs[:5], 3)[1] == flat.search(vecs[:5], 3)[1]).all()
    with pytest.raises(ValueError, match=r"retriever.index_factory 'NotAnIndex42': FAISS rejects it"):
        build_faiss_index(vecs, "NotAnIndex42")


# ---------------------------------------------------------------- hybrid and caches

def test_rrf_against_hand_computed_example():
    a = [Hit("x", 9.0, 1), Hit("y", 5.0, 2), Hit("z", 1.0, 3)]
    b = [Hit("z", 0.9, 1), Hit("x", 0.8, 2), Hit("w", 0.1, 3)]
    fused = dict(rrf_fuse([a, b], rrf_k=60))
    assert fused["x"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["z"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["y"] == pytest.approx(1 / 62) and fused["w"] == pytest.approx(1 / 63)
    assert [pid for pid, _ in rrf_fuse([a, b], 60)] == ["x", "z", "y", "w"]


def test_weighted_fusion_hand_computed():
    a = [Hit("x", 10.0, 1), Hit("y", 0.0, 2)]
    b = [Hit("y", 1.0, 1), Hit("z", 0.5, 2)]
    fused = dict(weighted_fuse(a, b, weight_second=0.25))
    assert fused == pytest.approx({"x": 0.75, "y": 0.25, "z": 0.0})


def test_hybrid_retriever_and_result_cache(tmp_path, encoder):
    bm25 = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    dense = DenseRetriever(PASSAGES, encoder=encoder, cache_dir=tmp_path, show_progress=False)
    hybrid = HybridRetriever(bm25, dense, depth=len(PASSAGES))
    hits = hybrid.retrieve(Q, k=3)
    expected = rrf_fuse([bm25.retrieve(Q[:1], 6)[0], dense.retrieve(Q[:1], 6)[0]])[:3]
    assert [(h.passage_id, h.score) for h in hits[0]] == expected

    calls = []

    class Counting:
        passages = PASSAGES

        def fingerprint(self):
            return hybrid.fingerprint()

        def retrieve(self, questions, k):
            calls.append(k)
            return hybrid.retrieve(questions, k)

    first = cached_retrieve(Counting(), Q, 3, cache_dir=tmp_path)
    second = cached_retrieve(Counting(), Q, 3, cache_dir=tmp_path)
    assert first == second == hits and calls == [3]
    cached_retrieve(Counting(), Q[:2], 3, cache_dir=tmp_path)  # another question set: a new entry
    assert calls == [3, 3]


def test_recall_rows_on_a_hand_built_example():
    questions = [QAExample("a", "q", ("Paris",), True), QAExample("b", "q", ("Seine",), True),
                 QAExample("c", "q", ("Tokyo",), False)]
    hits = [[Hit("Berlin#0", 1, 1), Hit("Paris#0", 0.5, 2)], [Hit("Seine#0", 1, 1), Hit("Alps#0", 0.1, 2)],
            [Hit("Alps#0", 1, 1), Hit("Rhine#0", 0.5, 2)]]
    ev = evaluate_contexts("toy", "toy n=3", questions, Contexts(hits, contexts_from_hits(hits, PASSAGES)))
    assert ev.matrix.tolist() == [[False, True], [True, False], [False, False]]
    row = recall_row(ev, "cfg", ks=[1, 2])
    assert row["R@1"] == pytest.approx(1 / 3) and row["R@2"] == pytest.approx(2 / 3)
    assert row["R@1_in_corpus"] == pytest.approx(0.5) and row["R@2_in_corpus"] == pytest.approx(1.0)
    assert row["n"] == 3 and row["n_answer_in_corpus"] == 2


def test_corpus_fingerprint_equals_json_lines_hash():
    import hashlib
    import json

    from rag_lab.retrievers.base import corpus_fingerprint

    tricky = PASSAGES + [Passage('Q"uote#0', "Ünïcode \\ back", 'tab\there, "quotes", newline\nand \u2028')]
    lines = "".join(json.dumps([p.id, p.title, p.text], ensure_ascii=False) + "\n" for p in tricky)
    assert corpus_fingerprint(tricky) == hashlib.sha256(lines.encode("utf-8")).hexdigest()
    assert corpus_fingerprint(tricky) != corpus_fingerprint(tricky[:-1])


def test_oracle_returns_answer_bearing_passages_best_bm25_first(tmp_path):
    from rag_lab.retrievers import OracleRetriever

    bm25 = BM25Retriever(PASSAGES, cache_dir=tmp_path, show_progress=False)
    oracle = OracleRetriever(PASSAGES, bm25)
    questions = Q + [QAExample("q3", "which river flows through France", ("France",)),
                     QAExample("q4", "what is on the moon", ("cheese",))]
    hits = oracle.retrieve(questions, k=5)
    # "Paris" occurs in Paris#0 and Seine#0 (title or text): both, the better BM25 match first
    assert [h.passage_id for h in hits[0]] == ["Paris#0", "Seine#0"]
    assert [h.passage_id for h in hits[1]] == ["Seine#0"]
    assert [h.passage_id for h in hits[2]] == ["Louis XIV#0"]
    # three passages say "France": the river passage matches the question best
    assert hits[3][0].passage_id == "Rhine#0" and {h.passage_id for h in hits[3]} == {"Rhine#0", "Paris#0", "Louis XIV#0"}
    assert hits[4] == []  # no passage holds the answer: no passage, never a wrong one
    assert [len(h) for h in oracle.retrieve(questions, k=1)] == [1, 1, 1, 1, 0]
    assert oracle.fingerprint() != bm25.fingerprint()


# ---------------------------------------------------------------- the int8 encoder engine (retriever.encoder_backend)

def test_ct2_encoder_equals_sentence_transformers_in_float32_and_stays_close_in_int8(encoder, tmp_path, monkeypatch):
    """The CTranslate2 engine pools as sentence-transformers does: in float32 the embeddings are equal; in int8
    they move only a little (the benchmark measures the recall this costs on real data)."""
    from rag_lab.models import load_sentence_encoder
    from rag_lab.retrievers.ct2_encoder import CT2SentenceEncoder

    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    _with_position_embedding_type(encoder)
    texts = [p.text for p in PASSAGES] + [q.question for q in Q]
    st = load_sentence_encoder(encoder)
    reference = st.encode(texts, normalize_embeddings=True)
    f32 = CT2SentenceEncoder(encoder, "float32", max_seq_length=128).encode(texts, batch_size=2)
    np.testing.assert_allclose(f32, reference, atol=1e-4)
    i8 = CT2SentenceEncoder(encoder, "int8", max_seq_length=128).encode(texts, batch_size=2)
    assert (i8 * reference).sum(axis=1).min() > 0.9
    assert np.allclose(np.linalg.norm(i8, axis=1), 1.0, atol=1e-5)


def _with_position_embedding_type(folder):
    """CTranslate2's BERT converter reads `position_embedding_type`, which every published BERT config (MiniLM's too)
    carries and a BertConfig built in a test leaves out."""
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "position_embedding_type": "absolute"}))


def test_dense_retriever_on_the_int8_engine_keys_its_own_cache(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    _with_position_embedding_type(encoder)
    f32 = DenseRetriever(PASSAGES, encoder, cache_dir=tmp_path, show_progress=False)
    i8 = DenseRetriever(PASSAGES, encoder, cache_dir=tmp_path, show_progress=False, encoder_backend="ctranslate2")
    assert f32.store.folder != i8.store.folder and f32.fingerprint() != i8.fingerprint()
    assert i8.build["kind"].endswith("(ctranslate2 int8)") and i8.build["precision"] == "int8"
    assert [h.passage_id for h in i8.retrieve(Q[:1], 2)[0]]  # it searches
    with pytest.raises(ValueError, match="encoder_backend 'onnx'"):
        DenseRetriever(PASSAGES, encoder, cache_dir=tmp_path, show_progress=False, encoder_backend="onnx")
