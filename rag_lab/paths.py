"""Where the repository's data and results live (overridable for installed copies)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Built benchmarks: `$RAG_LAB_DATA_DIR` or `<repo>/data`."""
    return Path(os.environ.get("RAG_LAB_DATA_DIR", REPO_ROOT / "data"))


def results_dir() -> Path:
    """Results tables and run folders: `$RAG_LAB_RESULTS_DIR` or `<repo>/results`."""
    return Path(os.environ.get("RAG_LAB_RESULTS_DIR", REPO_ROOT / "results"))


def source_data_dir() -> Path:
    """Raw sources for building nq-mini: `$RAG_LAB_SOURCE_DATA` or `<repo>/../shared/data`."""
    return Path(os.environ.get("RAG_LAB_SOURCE_DATA", REPO_ROOT.parent / "shared" / "data"))


def profile_results_dir(profile: str) -> Path:
    """The default profile writes the committed tables in results/; others write results/<profile>/."""
    return results_dir() if profile == "default" else results_dir() / profile


CACHE_KINDS = ("runs", "retrieval", "train", "models", "corpus")


def cache_dir(kind: str) -> Path:
    """The one place a cache folder is decided: `$RAG_LAB_CACHE/<kind>` when set; otherwise model
    weights (kind "models": downloads, de-quantised and converted checkpoints) are shared by every
    checkout under `~/.cache/rag_lab/models`, and what experiments compute (runs: generation
    stages; retrieval: indexes and results; train: fine-tuned checkpoints; corpus: corpora converted to Arrow) lives in `<repo>/cache/<kind>`
    (git-ignored)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind {kind!r}: kinds are {', '.join(CACHE_KINDS)}")
    root = os.environ.get("RAG_LAB_CACHE")
    if root:
        return Path(root) / kind
    return Path.home() / ".cache" / "rag_lab" / kind if kind == "models" else REPO_ROOT / "cache" / kind


def repo_path(path: str) -> str:
    """A relative path that exists under the repo root resolves there (configs say
    `cache/models/x`, whatever the working directory); anything else is returned as is."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    return path
