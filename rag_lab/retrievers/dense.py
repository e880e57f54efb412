"""Dense retrieval: a sentence-transformers encoder and a FAISS index over normalised embeddings.

Corpus embeddings are the expensive part (minutes on a CPU), so they are cached as a
float32 .npy keyed by (encoder weights, corpus content, max length, passage prefix); the
FAISS index is cached beside them keyed additionally by the factory string. Any change
of encoder or corpus gives a new key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.io import read_checked, stable_hash, write_checked
from rag_lab.models import load_sentence_encoder, model_fingerprint, resolve_model
from rag_lab.retrievers.base import Hit, check_k, check_questions, corpus_fingerprint, hits_from_arrays
from rag_lab.retrievers.cache import retriever_cache_dir
from rag_lab.timings import count_params, encoder_flops


class DenseRetriever:
    """Inner-product search over L2-normalised embeddings (= cosine similarity)."""

    def __init__(self, passages: Sequence[Passage], encoder: str = "all-minilm-l6-v2", query_prefix: str = "",
                 passage_prefix: str = "", max_length: int = 256, index_factory: str = "Flat",
                 search_params: str = "", batch_size: int = 64, cache_dir: Path | None = None,
                 show_progress: bool = True, model=None, query_encoder: str = ""):
        if not passages:
            raise ValueError("DenseRetriever needs a non-empty corpus")

        self.passages = list(passages)
        self.encoder_name = encoder
        self.model = model if model is not None else load_sentence_encoder(encoder)
        self.model.max_seq_length = max_length
        self.params = {"encoder": model_fingerprint(resolve_model(encoder)) if model is None else _module_fingerprint(model),
                       "query_prefix": query_prefix, "passage_prefix": passage_prefix, "max_length": max_length}
        # a query encoder of its own (trained end to end) reads the questions; the passages keep `encoder`'s embeddings
        self.query_model = self.model
        if query_encoder:
            self.query_model = load_sentence_encoder(query_encoder)
            self.query_model.max_seq_length = max_length
            self.params["query_encoder"] = model_fingerprint(resolve_model(query_encoder))
        self.index_factory, self.search_params = index_factory, search_params
        self.batch_size, self.show_progress = batch_size, show_progress
        self._corpus_hash = corpus_fingerprint(self.passages)
        self.cache_dir = retriever_cache_dir(cache_dir)
        self.cache_hit = {"embeddings": False, "index": False}
        self.build: dict | None = None  # {"kind", "seconds", "flops"} when this process encoded the corpus (timings.csv)
        self.embeddings = self._load_or_encode()
        self.index = self._load_or_build_index()

    def fingerprint(self) -> str:
        return stable_hash({"kind": "dense", **self.params, "corpus": self._corpus_hash,
                            "factory": self.index_factory, "search_params": self.search_params})

    def _embedding_key(self) -> str:
        passage_side = {k: v for k, v in self.params.items() if k not in ("query_prefix", "query_encoder")}
        return stable_hash({**passage_side, "corpus": self._corpus_hash})

    def encode(self, texts: list[str], prefix: str = "", progress: bool = False, model=None) -> np.ndarray:
        vecs = (model or self.model).encode([prefix + t for t in texts], batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _load_or_encode(self) -> np.ndarray:
        path = self.cache_dir / f"emb-{self._embedding_key()[:16]}.npy"
        cached = read_checked(path)  # checksum-verified; a damaged file is reported, deleted and re-encoded
        if cached is not None:
            self.cache_hit["embeddings"] = True
            return np.load(io.BytesIO(cached), allow_pickle=False)

        t0 = time.perf_counter()
        texts = [self.params["passage_prefix"] + passage_text(p) for p in self.passages]
        vecs = self.encode(texts, "", self.show_progress)
        _save_npy(path, vecs)
        self.build = {"kind": f"dense {Path(self.encoder_name).name}", "seconds": time.perf_counter() - t0,
                      "flops": self._encoding_flops(texts), "note": f"{len(texts)} passages encoded"}
        return vecs

    def _encoding_flops(self, texts: list[str]) -> float | None:
        """2 N per token over the tokens the encoder saw (truncated at max_length; padding not counted)."""
        try:
            tokenizer, net = self.model.tokenizer, self.model[0].auto_model
        except (AttributeError, IndexError, TypeError):  # an encoder that is not a transformers module
            return None
        lengths = tokenizer(texts, truncation=True, max_length=self.params["max_length"])["input_ids"]
        return encoder_flops(count_params(net), sum(map(len, lengths)))

    def _load_or_build_index(self) -> faiss.Index:
        path = self.cache_dir / f"faiss-{stable_hash([self._embedding_key(), self.index_factory])[:16]}.index"
        cached = read_checked(path)
        if cached is not None:
            self.cache_hit["index"] = True
            index = faiss.deserialize_index(np.frombuffer(cached, dtype=np.uint8))
        else:
            index = build_faiss_index(self.embeddings, self.index_factory)
            write_checked(path, faiss.serialize_index(index).tobytes())
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(index, self.search_params)
        return index

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = min(check_k(k), len(self.passages))
        queries = self.encode(check_questions(questions), self.params["query_prefix"], self.show_progress and len(questions) > 256,
                              self.query_model)
        scores, indices = self.index.search(queries, k)
        return hits_from_arrays(self.passages, indices, scores)


def build_faiss_index(vectors: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """`faiss.index_factory` with inner product; trains (IVF/PQ) on the vectors themselves."""
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS rejected index_factory string {factory!r}: {str(e).strip().splitlines()[-1]}") from None
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_checked(path, buf.getvalue())


def _module_fingerprint(model) -> str:
    """For an in-memory encoder (tests): a hash of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()
