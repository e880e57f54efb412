"""Issue 22, item 2: what a cache trusts, and when. A folder's files are hashed in full against its
manifest at the first use in each process (`forget_verified` is what a new process starts with); a
model's fingerprint covers every byte of every weight file."""
from __future__ import annotations

import os
import warnings

import pytest

from rag_lab import models
from rag_lab.models import load as models_load
from rag_lab.io import MANIFEST, CacheRepaired, forget_verified, verified_folder, write_manifest


def restore_mtime(path, stat) -> None:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def zero_middle(path) -> None:
    """Zero 4 KiB in the middle of a file, keeping its size and mtime (what the stamp check missed)."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        f.write(b"\0" * 4096)
    restore_mtime(path, stat)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "index"
    d.mkdir()
    (d / "emb.npy").write_bytes(os.urandom(1 << 16))
    (d / "index.faiss").write_bytes(os.urandom(1 << 16))
    write_manifest(d)
    return d


@pytest.mark.parametrize("name", ["emb.npy", "index.faiss"])
def test_a_body_zeroed_with_size_and_mtime_kept_is_caught_by_the_next_process(folder, name):
    assert verified_folder(folder)
    zero_middle(folder / name)
    forget_verified()  # a new process
    with pytest.warns(CacheRepaired, match=f"{name} differs from {MANIFEST}"):
        assert not verified_folder(folder)
    assert not folder.exists()  # deleted: rebuilt by its owner, never served


def test_within_a_process_a_verified_folder_is_hashed_once_and_again_when_its_stamps_change(folder, monkeypatch):
    import rag_lab.io as io_module

    assert verified_folder(folder)
    hashed = []
    real = io_module.sha256_file
    monkeypatch.setattr(io_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert verified_folder(folder) and hashed == []  # trusted: same process, same stamps
    (folder / "emb.npy").write_bytes(b"x" * (1 << 16))  # same size, new mtime
    with pytest.warns(CacheRepaired):
        assert not verified_folder(folder)


def test_a_clean_folder_passes_the_first_check_of_each_process_without_a_warning(folder):
    for _ in range(2):
        forget_verified()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert verified_folder(folder)


def test_the_model_fingerprint_covers_every_byte_of_a_large_file(tmp_path):
    """It used to hash the first and last 8 MiB only: one layer-norm zeroed in the middle kept the old key."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(40 << 20))  # 40 MiB: the middle was never read
    before = models.model_fingerprint(model)
    zero_middle(model / "model.safetensors")
    models_load._folder_fingerprint.cache_clear()  # a new process (the cache is keyed on size and mtime)
    assert models.model_fingerprint(model) != before


def test_a_verified_folder_fingerprints_from_its_manifest_without_reading_the_weights_again(tmp_path, monkeypatch):
    import rag_lab.io as io_module

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(1 << 20))
    write_manifest(model)
    unverified = models.model_fingerprint(model)
    models_load._folder_fingerprint.cache_clear()
    assert verified_folder(model)
    monkeypatch.setattr(models_load, "sha256_file", lambda p: pytest.fail(f"{p} hashed twice"))
    monkeypatch.setattr(io_module, "sha256_file", lambda p: pytest.fail(f"{p} hashed twice"))
    assert models.model_fingerprint(model) == unverified  # the same identity either way


def test_a_shard_folder_claiming_more_rows_than_it_holds_is_encoded_again(tmp_path):
    """Issue 22, item 5: `rows-0-8/emb.npy` holding 5 rows (its manifest written over those bytes) was
    served as rows 0-8, shifting every later passage's vector."""
    import numpy as np
    from rag_lab.retrievers.dense import EmbeddingStore

    store = EmbeddingStore(tmp_path / "emb", n_rows=16, chunk=8)
    encode = lambda a, b: np.full((b - a, 4), a, dtype=np.float32)  # noqa: E731 (rows a..b-1 of a fake encoder)
    good = store.write_shard(8, 16, encode, np.float32)
    short = store.shard_folder(0, 8)
    short.mkdir(parents=True)
    np.save(short / "emb.npy", np.zeros((5, 4), np.float32))
    write_manifest(short)
    with pytest.warns(CacheRepaired, match="emb.npy holds 5 rows, its name claims 8"):
        shards, missing = store.walk()
    assert [s[2] for s in shards] == [good] and missing == [(0, 8)] and not short.exists()
    store.write_shard(0, 8, encode, np.float32)
    assert store.missing() == [] and len(store.shards()) == 2
