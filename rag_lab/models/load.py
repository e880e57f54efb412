"""Loading models (float32, no remote code, safetensors), a checkpoint's content fingerprint, and the
transformers log lines we drop where they are expected."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from rag_lab.io import sha256_file, verified_digests
from rag_lab.models.fetch import resolve_model
from rag_lab.models.registry import NOT_WEIGHTS


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a decoder-only LM, in eval mode, tokenizer padding on the left.

    Left padding because batched generation appends new tokens on the right: with right
    padding, the shorter prompts would continue after their pad tokens.
    """
    path = str(resolve_model(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = load_tokenizer(path, padding_side="left")
    return _finish(model, tokenizer)


def load_seq2seq_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an encoder-decoder LM (T5, BART), in eval mode.

    Padding stays on the right: the encoder reads the whole input with an attention mask
    and the decoder starts fresh, so the side does not matter and right is how T5 was trained.
    """
    path = str(resolve_model(name_or_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = load_tokenizer(path, padding_side="right")
    return _finish(model, tokenizer)


def load_sentence_encoder(name_or_path: str, device: str | None = None):
    """A SentenceTransformer; a plain transformers encoder gets mean pooling automatically."""
    from sentence_transformers import SentenceTransformer  # why: ~5 s to import; only dense retrieval needs it

    path = str(resolve_model(name_or_path))
    return SentenceTransformer(path, device=device, trust_remote_code=False, model_kwargs={"use_safetensors": True})


def load_tokenizer(path: str, padding_side: str):
    """A tokenizer with a pad token (eos if it has none): batching needs one."""
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


@functools.lru_cache(maxsize=32)
def _folder_fingerprint(path: str, stamp: tuple) -> str:
    """sha256 over every file's name, size and full sha256 (an edit anywhere in the weights changes it);
    the digests come from the manifest when this process has verified the folder in full, else each
    file is hashed. Cached per process on the files' size and mtime."""
    digests = verified_digests(Path(path)) or {}
    h = hashlib.sha256()
    for name, size, _ in stamp:
        digest = digests.get(name) or sha256_file(Path(path) / name)
        h.update(f"{name}\0{size}\0{digest}\0".encode())
    return h.hexdigest()


def model_fingerprint(resolved: str | Path) -> str:
    """A content hash of a local checkpoint folder (every byte of every weight file: retraining into the
    same path, or editing one tensor, changes it), used in cache keys; for a hub id, the id itself."""
    path = Path(resolved)
    if not path.is_dir():
        return str(resolved)
    # what the model computes with, not how it was made: a training report (its seconds) or a manifest
    # differs between two trainings that give the same weights, and must not give another run id
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".") and f.name not in NOT_WEIGHTS)
    stamp = tuple((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _folder_fingerprint(str(path), stamp)


@contextlib.contextmanager
def unreported(logger_name: str, fragment: str):
    """Drop the records of one transformers logger whose message contains `fragment`, inside the block: a
    report that is expected where it is used (each caller says why); every other record still passes."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    drop, logger = Drop(), logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
