"""A sentence-transformers encoder run on CTranslate2 int8 (`retriever.encoder_backend: ctranslate2`).

Why: encoding the corpus is a dense index's cost, and it is compute-bound (every passage token goes
through every layer). On this CPU an int8 GEMM runs at ~850 GOP/s against ~180 GFLOP/s in float32,
so the int8 engine encodes passages faster; the embeddings move a little (benchmarks/README.md
measures passages/s and recall@20 side by side with float32). PyTorch dynamic int8 quantisation was
measured too lossy here (cosine 0.93 to float32, ../shared/data/README.md), CTranslate2's int8 keeps 0.997.

The checkpoint (the transformer of a sentence-transformers folder, e.g. all-MiniLM-L6-v2) is converted
once into a cache keyed by its content (`generators.ct2.convert`); pooling follows the folder's
`1_Pooling/config.json` (mean over the tokens, the only mode supported here), then L2 normalisation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from rag_lab.models import BackendError, convert, load_tokenizer, require_ctranslate2, resolve_model


class CT2SentenceEncoder:
    """`encode(texts, batch_size, normalize_embeddings, ...)` as `SentenceTransformer.encode` has it, computed
    by a CTranslate2 `Encoder` in `compute_type` (int8 by default); batches are sorted by length, so little
    padding is computed."""

    def __init__(self, name_or_path: str, compute_type: str = "int8", max_seq_length: int = 256, device: str | None = None):
        ctranslate2 = require_ctranslate2()
        path = Path(resolve_model(name_or_path))
        if not (path / "config.json").is_file():
            raise BackendError(f"retriever.encoder_backend: ctranslate2 converts a local sentence-transformers folder; "
                               f"{path} has no config.json (use encoder_backend: sentence-transformers)")
        self.pooling = _pooling_mode(path)
        self.tokenizer = load_tokenizer(str(path), padding_side="right")
        self.max_seq_length = max_seq_length
        self.compute_type = compute_type
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = ctranslate2.Encoder(str(convert(path, compute_type)), device=device, compute_type=compute_type)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.n_params = _bert_params(config)  # for timings.csv's FLOPs (2 N per token), input embeddings left out

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True, show_progress_bar: bool = False) -> np.ndarray:
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = None
        for start in tqdm(range(0, len(ids), batch_size), desc="encode (ct2)", disable=not show_progress_bar):
            rows = order[start:start + batch_size]
            batch = [ids[i] for i in rows]
            hidden = np.asarray(self.encoder.forward_batch(batch).last_hidden_state, dtype=np.float32)  # [B, T, H]
            lengths = np.array([len(x) for x in batch])
            mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / lengths[:, None]
            if out is None:
                out = np.empty((len(ids), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
        if out is None:
            return np.zeros((0, 0), dtype=np.float32)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def _pooling_mode(path: Path) -> str:
    """Mean pooling, read off the folder's pooling config (a sentence-transformers folder without one is
    a plain transformers encoder, which sentence-transformers mean-pools too); any other mode is an error."""
    config = path / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    modes = {k for k, v in json.loads(config.read_text(encoding="utf-8")).items() if k.startswith("pooling_mode") and v}
    if modes != {"pooling_mode_mean_tokens"}:
        raise BackendError(f"{config}: pooling {sorted(modes)}; the ctranslate2 encoder supports mean pooling only "
                           "(use retriever.encoder_backend: sentence-transformers)")
    return "mean"


def _bert_params(config: dict) -> int | None:
    """Weights a token goes through in a BERT-style encoder (layers only): 12 h^2 + 13 h per layer, roughly."""
    h, layers, inner = config.get("hidden_size"), config.get("num_hidden_layers"), config.get("intermediate_size")
    if not (h and layers and inner):
        return None
    return layers * (4 * h * h + 2 * h * inner)
