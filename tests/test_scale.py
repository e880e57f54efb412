"""Issue 15: sharded dense encoding (any shard count gives the same bytes), resumable shards, IVF-PQ
from float16 shards read memory-mapped, BM25 built in chunks == bm25s, `rag-lab index`, Ray Data
encoding and generation on a local 2-worker Ray, and the vLLM backend's mapping."""
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import bm25s
import faiss
import numpy as np
import pytest
import torch

import fake_vllm
from rag_lab.config import ConfigError, GeneratorConfig, RetrieverConfig
from rag_lab.data.corpus import Corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.generators import build_generator
from rag_lab.generators.ct2 import BackendError
from rag_lab.retrievers import BM25Retriever, DenseRetriever, dense_encoder, shard_rows
from rag_lab.retrievers.bm25 import build_bm25_index
from tiny_models import make_tiny_causal_lm, make_tiny_encoder

WORDS = "paris france berlin germany river seine rhine king louis capital city mountain alps year born".split()
PASSAGES = [Passage(f"p{i}", f"T{i % 7}", " ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(3 + i % 11)))
            for i in range(45)]
QUESTIONS = [QAExample("q0", "capital of france", ("paris",)), QAExample("q1", "river in germany", ("rhine",)),
             QAExample("q2", "king louis born year", ("1638",))]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "tiny"
    return str(make_tiny_encoder(path, [p.text for p in PASSAGES] + [q.question for q in QUESTIONS]))


def dense(encoder, cache, **kw):
    return DenseRetriever(PASSAGES, encoder=encoder, cache_dir=cache, show_progress=False, chunk=8, **kw)


def test_shard_rows_are_whole_chunks_and_tile():
    for n, shards in ((45, 2), (45, 3), (45, 6), (8, 3), (1, 1)):
        ranges = [shard_rows(n, i, shards, chunk=8) for i in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % 8 == 0 for start, _ in ranges)
    with pytest.raises(ValueError, match="shards are numbered 0..1"):
        shard_rows(45, 2, 2)


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_encoding_equals_one_process_bit_for_bit(tmp_path, encoder, n_shards):
    whole = dense(encoder, tmp_path / "one")
    assert whole.build is not None
    part = dense(encoder, tmp_path / "many", build=False)
    for i in reversed(range(n_shards)):  # any order: each worker writes its own rows
        part.encode_shard(i, n_shards)
    assert len(part.store.shards()) == n_shards and part.store.missing() == []
    again = dense(encoder, tmp_path / "many")
    assert again.cache_hit == {"embeddings": True, "index": False} and again.build is None
    assert np.array_equal(np.asarray(again.embeddings), np.asarray(whole.embeddings))  # bit-exact on the CPU
    assert again.retrieve(QUESTIONS, 5) == whole.retrieve(QUESTIONS, 5)


def test_a_lost_shard_is_encoded_again_alone(tmp_path, encoder):
    first = dense(encoder, tmp_path)
    reference = np.array(first.embeddings)
    part = dense(encoder, tmp_path / "p", build=False)
    for i in range(3):
        part.encode_shard(i, 3)
    lost = part.store.shards()[1]
    shutil.rmtree(lost[2])
    assert part.store.missing() == [lost[:2]]
    again = dense(encoder, tmp_path / "p")
    assert again.build["note"] == f"{lost[1] - lost[0]} passages encoded"  # only the lost rows
    assert np.array_equal(np.asarray(again.embeddings), reference)


def test_ivf_pq_over_float16_shards_is_memory_mapped(tmp_path, encoder):
    flat = dense(encoder, tmp_path, embedding_dtype="float16")
    assert flat.embeddings.dtype == np.float16 and isinstance(flat.embeddings, np.memmap)
    assert flat.fingerprint() != dense(encoder, tmp_path / "f32").fingerprint()  # the dtype is in the key
    exact_ivf = dense(encoder, tmp_path, embedding_dtype="float16", index_factory="IVF4,Flat", search_params="nprobe=4")
    assert [[h.passage_id for h in row] for row in exact_ivf.retrieve(QUESTIONS, 5)] == \
        [[h.passage_id for h in row] for row in flat.retrieve(QUESTIONS, 5)]
    pq = dense(encoder, tmp_path, embedding_dtype="float16", index_factory="IVF4,PQ8x4", search_params="nprobe=4")
    # the codes stay in the file: FAISS's on-disk inverted lists over a read-only memory map
    assert type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(pq.index).invlists)).__name__ == "OnDiskInvertedLists"
    hits = pq.retrieve(QUESTIONS, 5)
    assert pq.index.ntotal == len(PASSAGES) and all(len(h) == 5 for h in hits)
    top1 = [row[0].passage_id for row in flat.retrieve(QUESTIONS, 1)]
    assert sum(t in [h.passage_id for h in row] for t, row in zip(top1, hits)) >= 2  # PQ is lossy, not blind


def test_ivf_trains_on_a_seeded_sample(tmp_path):
    from rag_lab.retrievers.dense import build_faiss_index

    vecs = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    a = build_faiss_index(vecs, "IVF4,Flat", train_rows=100)
    b = build_faiss_index(vecs, "IVF4,Flat", train_rows=100)
    full = build_faiss_index(vecs, "IVF4,Flat", train_rows=10_000)
    centroids = lambda ix: faiss.extract_index_ivf(ix).quantizer.reconstruct_n(0, 4)  # noqa: E731
    assert np.array_equal(centroids(a), centroids(b)) and not np.array_equal(centroids(a), centroids(full))


def test_chunked_bm25_equals_bm25s(tmp_path):
    texts = [f"{p.title}. {p.text}" for p in PASSAGES]
    retriever = BM25Retriever(PASSAGES, cache_dir=tmp_path / "c", show_progress=False, chunk_rows=7)
    stem = retriever._stemmer
    reference = bm25s.BM25(k1=1.5, b=0.75)
    reference.index(bm25s.tokenize(texts, stopwords="en", stemmer=stem, show_progress=False), show_progress=False)
    build_bm25_index(Corpus.from_passages(PASSAGES), tmp_path / "ours", retriever.tokenize, 1.5, 0.75, chunk_rows=7,
                     show_progress=False, map_bytes=200)  # 200 bytes of output per pass: several column passes
    ours = bm25s.BM25.load(str(tmp_path / "ours"), mmap=True)
    assert isinstance(ours.scores["data"], np.memmap)
    for token, j in reference.vocab_dict.items():
        if token:
            k, r, o = ours.vocab_dict[token], reference.scores, ours.scores
            assert np.array_equal(r["data"][r["indptr"][j]:r["indptr"][j + 1]], o["data"][o["indptr"][k]:o["indptr"][k + 1]])
            assert np.array_equal(r["indices"][r["indptr"][j]:r["indptr"][j + 1]], o["indices"][o["indptr"][k]:o["indptr"][k + 1]])
    tokens = retriever.tokenize([q.question for q in QUESTIONS])
    for x, y in zip(reference.retrieve(tokens, k=5, show_progress=False), ours.retrieve(tokens, k=5, show_progress=False)):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------- rag-lab index

def _index(*args, env):
    return subprocess.run([sys.executable, "-m", "rag_lab.cli", "index", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_rag_lab_index_shards_then_builds_and_the_run_finds_it(tmp_path):
    import os

    env = {**os.environ, "RAG_LAB_CACHE": str(tmp_path / "cache"), "RAG_LAB_RESULTS_DIR": str(tmp_path / "results")}
    config = "experiments/rag_zero_shot_dense.yaml"
    shard = _index(config, "--profile", "smoke", "--shard", "1/2", env=env)
    assert shard.returncode == 0, shard.stderr
    assert "shard 1/2: " in shard.stdout and "every shard is encoded" in shard.stdout  # 200 passages: one encoder chunk
    empty = _index(config, "--profile", "smoke", "--shard", "0/2", env=env)
    assert "no rows" in empty.stdout
    built = _index(config, "--profile", "smoke", env=env)
    assert built.returncode == 0 and "DenseRetriever: built" in built.stdout  # the index; the embeddings were there
    again = _index(config, "--profile", "smoke", env=env)
    assert "DenseRetriever: loaded from the cache" in again.stdout
    bad = _index("experiments/rag_zero_shot_bm25.yaml", "--profile", "smoke", "--shard", "0/2", env=env)
    assert bad.returncode == 2 and "retriever.kind 'bm25' builds in one process" in bad.stderr
    worse = _index(config, "--profile", "smoke", "--shard", "2/2", env=env)
    assert worse.returncode == 2 and "--shard '2/2': write i/n with 0 <= i < n" in worse.stderr


# ---------------------------------------------------------------- Ray Data (local, 2 CPU workers)

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='the Ray path needs pip install -e ".[scale]" (make venv installs it)')
    from rag_lab.scale import start_ray

    start_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_data_encoding_equals_in_process(tmp_path, encoder, local_ray):
    from rag_lab.scale import ray_encode

    cfg = RetrieverConfig(kind="dense", encoder=encoder)
    reference = dense_encoder(cfg, PASSAGES, tmp_path / "here", show_progress=False, chunk=8, build=True)
    records = ray_encode(cfg, Corpus.from_passages(PASSAGES), tmp_path / "ray", workers=2, n_shards=4, chunk=8)
    assert [r["shard"] for r in records] == [0, 1, 2, 3] and len({r["host"] for r in records}) >= 1
    from_ray = dense_encoder(cfg, PASSAGES, tmp_path / "ray", show_progress=False, chunk=8, build=True)
    assert from_ray.cache_hit["embeddings"] and len(from_ray.store.shards()) == 4
    assert np.array_equal(np.asarray(from_ray.embeddings), np.asarray(reference.embeddings))


@pytest.mark.slow
def test_ray_data_generation_equals_one_generator(tmp_path, local_ray):
    from rag_lab.scale import ray_generate

    model, tok = make_tiny_causal_lm()
    model.save_pretrained(str(tmp_path / "lm")), tok.save_pretrained(str(tmp_path / "lm"))
    cfg = GeneratorConfig(model=str(tmp_path / "lm"), max_new_tokens=4, batch_size=2, max_input_tokens=60,
                          closed_book_template="question {question} answer", rag_template="{context} question {question} answer",
                          system_prompt="")
    contexts = [PASSAGES[i:i + 2] for i in range(len(QUESTIONS))]
    expected = build_generator(cfg).generate(QUESTIONS, contexts)
    assert ray_generate(cfg, QUESTIONS, contexts, workers=2) == expected


# ---------------------------------------------------------------- vLLM (the real API's shapes; see fake_vllm)

@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, tok = make_tiny_causal_lm()
    with torch.no_grad():  # greedy choices far from ties: two engines' float noise must not flip an argmax
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(tmp_path / "tiny")), tok.save_pretrained(str(tmp_path / "tiny"))
    return tmp_path / "tiny"


def _gen_config(path, **kw):
    return GeneratorConfig(model=str(path), max_new_tokens=6, batch_size=4, max_input_tokens=60,
                           closed_book_template="question {question} answer", rag_template="{context} question {question} answer",
                           system_prompt="", **kw)


def test_vllm_backend_gives_the_transformers_records(tiny_checkpoint, monkeypatch):
    fake_vllm.install(monkeypatch)
    hf = build_generator(_gen_config(tiny_checkpoint))
    fast = build_generator(_gen_config(tiny_checkpoint, backend="vllm", vllm_tensor_parallel=2, vllm_dtype="float32"))
    assert fake_vllm.calls[0]["init"] == {"model": str(tiny_checkpoint), "tokenizer": str(tiny_checkpoint),
                                         "tensor_parallel_size": 2, "dtype": "float32"}
    for contexts in (None, [PASSAGES[:2]] * len(QUESTIONS)):
        expected, got = hf.generate(QUESTIONS, contexts), fast.generate(QUESTIONS, contexts)
        assert got == expected  # every field: raw, prediction, prompt tokens, truncation
    assert {c.get("use_tqdm") for c in fake_vllm.calls[1:]} == {False}
    batches, seen = [], []
    full = fast.generate(QUESTIONS, on_batch=lambda idx, raws: batches.append(idx))
    assert fast.generate(QUESTIONS, done={i: full[i]["raw"] for i in batches[0]},
                         on_batch=lambda idx, raws: seen.append(idx)) == full and seen == batches[1:]


def test_vllm_errors_are_clear(tiny_checkpoint, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(BackendError, match="generator.backend: vllm needs the vllm package"):
        build_generator(_gen_config(tiny_checkpoint, backend="vllm"))
    with pytest.raises(ConfigError, match="generator.backend: vllm serves decoder readers"):
        _gen_config(tiny_checkpoint, backend="vllm", kind="seq2seq")
    with pytest.raises(ConfigError, match="vllm_tensor_parallel must be >= 1"):
        _gen_config(tiny_checkpoint, backend="vllm", vllm_tensor_parallel=0)


# ---------------------------------------------------------------- accelerate: the runner launched as 2 processes

@pytest.mark.slow
def test_lora_rag_finetune_runs_under_accelerate_launch(tmp_path):
    """`accelerate launch --config_file experiments/accelerate/cpu_2proc.yaml -m rag_lab.cli run X.yaml`: both
    ranks train one DDP model (global batch 2 x 2), rank 0 alone evaluates and writes the one row."""
    import json
    import os

    import pandas as pd

    qa = [{"id": f"q{i}", "question": q.question, "answers": list(q.answers)} for i, q in enumerate(QUESTIONS)]
    train = [{"id": f"t{i}", "question": f"which {w} is in the {v}", "answers": [w]} for i, (w, v) in
             enumerate(zip(WORDS[:6], WORDS[6:12]))]
    for name, rows in (("qa.jsonl", qa), ("train.jsonl", train), ("corpus.jsonl", [p.to_dict() for p in PASSAGES])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_tiny_causal_lm(tmp_path / "model")
    (tmp_path / "lora.yaml").write_text(
        f"name: rag_lora_tiny\nregime: rag_ft\nretriever: {{kind: bm25, k: 2}}\n"
        f"data: {{dataset: {tmp_path}/qa.jsonl, train_split: {tmp_path}/train.jsonl, corpus: {tmp_path}/corpus.jsonl}}\n"
        f"generator: {{model: {tmp_path}/model, batch_size: 2, max_new_tokens: 3, use_chat_template: false}}\n"
        "training: {enabled: true, method: lora, lora_targets: [q_proj, v_proj], epochs: 2, batch_size: 2, eval_steps: 1, "
        "dev_size: 2, learning_rate: 0.01, group_by_length: false}\n")
    env = {**os.environ, "RAG_LAB_RESULTS_DIR": str(tmp_path / "results"), "RAG_LAB_CACHE": str(tmp_path / "cache")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "experiments" / "accelerate" / "cpu_2proc.yaml"), "-m", "rag_lab.cli", "run", str(tmp_path / "lora.yaml")]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    rank0 = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank0]"))  # the cause, when rank 0 fails
    assert proc.returncode == 0, (rank0 or proc.stderr)[-3000:]
    assert proc.stdout.count("rag_lora_tiny [default] n=3") == 1  # one report: rank 0's
    (run_dir,) = (tmp_path / "results" / "runs" / "rag_lora_tiny").iterdir()
    training = json.loads((run_dir / "training.json").read_text())["0"]
    assert training["n_train"] == 4 and training["global_step"] == 2  # 4 examples / (2 ranks x 2) x 2 epochs
    assert pd.read_csv(tmp_path / "results" / "main_table.csv")["experiment"].tolist() == ["rag_lora_tiny"]
