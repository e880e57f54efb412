"""The de-quantised float32 cache of a GGUF checkpoint: built once from the verified GGUF, named by what it
was built from, swapped in atomically, rebuilt when stale."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_lab.io import sha256_file, verified_folder, write_manifest
from rag_lab.models.registry import CACHE_FORMAT, EmbeddedModel, SOURCE_FILE
from rag_lab.paths import cache_dir


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file; size and mtime are in the key so a replaced file is re-hashed."""
    return sha256_file(path)


def _expected_source(entry: EmbeddedModel, gguf: Path) -> dict:
    """What a fresh cache's rag_lab_source.json must say."""
    if entry.parts:  # `gguf` came from _ensure_split_file, which checked it against the pin
        origin = {"wheels": [p.requirement for p in entry.parts]}
        digest = entry.file_sha256
    else:
        try:
            version = importlib.metadata.version(entry.dist_name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        origin = {"package": entry.dist_name, "package_version": version}
        st = gguf.stat()
        digest = _sha256(gguf, st.st_size, st.st_mtime_ns)
    return {"cache_format": CACHE_FORMAT, **origin, "gguf_file": gguf.name, "gguf_sha256": digest}


def _cache_is_fresh(target: Path, expected: dict) -> bool:
    """True if `target` is a complete cache built from the source described by `expected`."""
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):  # missing or corrupt -> rebuild
        return False
    if not all((target / f).is_file() for f in ("model.safetensors", "config.json")):
        return False
    if not (isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected.items())):
        return False
    return verified_folder(target)  # every file against the manifest written at build (a damaged one: rebuilt)


def _ensure_gguf_cache(entry: EmbeddedModel, gguf: Path) -> Path:
    """Return the safetensors cache of a GGUF model, (re)building it when stale.

    Concurrency: builders serialise on a file lock, and a cache appears only by renaming
    a complete temp directory into place, so readers never see a half-written one.
    """
    root = cache_dir("models")
    target = root / entry.name
    expected = _expected_source(entry, gguf)
    if _cache_is_fresh(target, expected):  # fast path: no lock
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{entry.name}.lock")):
        if _cache_is_fresh(target, expected):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=root))
        try:
            _dequantise_gguf(gguf, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(expected, indent=2) + "\n")
            write_manifest(tmp)  # last: the size and sha256 of every file, checked on load
            _swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename the directory `new` to `target`, replacing an old one.

    rename() cannot replace a non-empty directory, so the old one is moved aside first.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF model with transformers (de-quantising to float32) and save it to `out`
    as a plain checkpoint: model.safetensors, config.json, generation_config.json, tokenizer.

    Why by hand: transformers marks GGUF-loaded models non-serialisable (save_pretrained raises).
    """
    kwargs = dict(gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses shared tensors; with tied embeddings lm_head.weight *is* the
    # embedding matrix, and from_pretrained re-ties it from the config.
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_diff_dict()
    # The config still says "quantised with gguf"; left in, from_pretrained would look for the GGUF.
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config["architectures"] = [type(model).__name__]  # GGUF configs lack it; pipelines want it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    # The GGUF tokenizer has no length limit (model_max_length ~1e30); truncation wants the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(str(out))  # includes the chat template read from the GGUF
