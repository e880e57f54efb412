"""Dense retrieval: a sentence-transformers encoder and a FAISS index over normalised embeddings.

Corpus embeddings are the expensive part (minutes on a CPU, GPU-hours for Wikipedia), so they are
written shard by shard into memory-mapped .npy files (float32, or float16 with
`retriever.embedding_dtype`) under `emb-<key>/rows-<start>-<stop>/`, keyed by (encoder weights,
corpus content, max length, passage prefix). A shard is a range of whole `ENCODE_CHUNK`-row chunks
and each chunk is one encoder call, so any split into shards — one process, `rag-lab index --shard
i/n` on several GPUs, Ray workers — gives the same bytes, and a killed build resumes at the first
missing shard. The FAISS index is built from the shards (IVF/PQ trained on a seeded sample, vectors
added chunk by chunk) and cached beside them, keyed additionally by the factory string; it is read
back memory-mapped, so an IVF-PQ index needs memory for what a search touches, not the vectors.
Any change of encoder or corpus gives a new key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.io import atomic_dir, discard, stable_hash, verified_folder, write_manifest
from rag_lab.models import load_sentence_encoder, model_fingerprint, resolve_model
from rag_lab.retrievers.base import Hit, RetrieverSettingError, check_k, check_questions, hits_from_arrays
from rag_lab.retrievers.cache import retriever_cache_dir
from rag_lab.flops import count_params, encoder_flops

def _ct2_encoder(name: str, max_length: int):
    from rag_lab.retrievers.ct2_encoder import CT2SentenceEncoder  # why: ctranslate2 only for the int8 engine

    return CT2SentenceEncoder(name, "int8", max_length)


# retriever.encoder_backend -> (encoder name, max length) -> an object with SentenceTransformer's `encode`
ENCODER_BACKENDS = {"sentence-transformers": lambda name, max_length: load_sentence_encoder(name),
                    "ctranslate2": _ct2_encoder}
ENCODE_CHUNK = 131_072  # passages per encoder call; shards are whole chunks (same bytes for any shard count)
TRAIN_ROWS = 262_144  # an IVF/PQ index trains on at most this many rows (or 64 per list), a seeded sample
EMBEDDING_DTYPES = {"float32": np.float32, "float16": np.float16}


def shard_rows(n_rows: int, shard: int, n_shards: int, chunk: int = ENCODE_CHUNK) -> tuple[int, int]:
    """Rows [start, stop) of shard `shard` of `n_shards`: whole chunks, as even as they divide."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards}: shards are numbered 0..{n_shards - 1}")
    n_chunks = -(-n_rows // chunk)
    first, last = shard * n_chunks // n_shards, (shard + 1) * n_chunks // n_shards
    return min(first * chunk, n_rows), min(last * chunk, n_rows)


class EmbeddingStore:
    """The corpus embeddings of one key: complete shard folders `rows-<start>-<stop>/emb.npy`, each
    written whole (atomic folder + manifest), read memory-mapped."""

    def __init__(self, folder: Path, n_rows: int, chunk: int = ENCODE_CHUNK):
        self.folder, self.n_rows, self.chunk = Path(folder), n_rows, chunk

    def shard_folder(self, start: int, stop: int) -> Path:
        return self.folder / f"rows-{start:011d}-{stop:011d}"

    def walk(self) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int]]]:
        """(complete shards in row order, uncovered row ranges): a damaged shard is deleted on the way."""
        found: dict[int, list[tuple[int, Path]]] = {}
        for d in sorted(self.folder.glob("rows-*")) if self.folder.is_dir() else []:
            parts = d.name.split("-")
            if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
                continue
            start, stop = int(parts[1]), int(parts[2])
            if start < stop <= self.n_rows and verified_folder(d) and _holds_rows(d, stop - start):
                found.setdefault(start, []).append((stop, d))
        shards, gaps, pos = [], [], 0
        while pos < self.n_rows:
            if pos in found:
                stop, d = max(found[pos])
                shards.append((pos, stop, d))
                pos = stop
            else:
                nxt = min((s for s in found if s > pos), default=self.n_rows)
                gaps.append((pos, nxt))
                pos = nxt
        return shards, gaps

    def shards(self) -> list[tuple[int, int, Path]]:
        """Complete shards in row order (they tile [0, n) once `missing()` is empty)."""
        return self.walk()[0]

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges no complete shard covers yet."""
        return self.walk()[1]

    def write_shard(self, start: int, stop: int, encode: Callable[[int, int], np.ndarray], dtype,
                    show_progress: bool = False) -> Path:
        """Encode rows [start, stop) chunk by chunk (`encode(a, b)` -> float32 [b - a, d]) into one shard."""
        target = self.shard_folder(start, stop)
        if target.exists() and verified_folder(target) and _holds_rows(target, stop - start):
            return target
        with atomic_dir(target) as tmp:
            out = None
            bar = tqdm(total=stop - start, desc=f"encode rows {start}-{stop}", unit=" passages", disable=not show_progress)
            for a in range(start, stop, self.chunk):
                vecs = encode(a, min(a + self.chunk, stop))
                if out is None:
                    out = np.lib.format.open_memmap(tmp / "emb.npy", "w+", dtype, (stop - start, vecs.shape[1]))
                out[a - start:a - start + len(vecs)] = vecs
                bar.update(len(vecs))
            bar.close()
            out.flush()
            del out
            write_manifest(tmp)
        return target


def _holds_rows(shard: Path, n: int) -> bool:
    """A shard's emb.npy holds the rows its name claims (a manifest proves the bytes, not that they
    are the right rows); otherwise it is reported, deleted and encoded again."""
    try:
        rows = np.load(shard / "emb.npy", mmap_mode="r").shape[0]
    except (OSError, ValueError) as e:
        discard(shard, f"emb.npy is not a readable array ({e})")
        return False
    if rows != n:
        discard(shard, f"emb.npy holds {rows} rows, its name claims {n}")
        return False
    return True


class ShardedEmbeddings:
    """Row access across shard files (memory-mapped): `emb[rows]` -> float32 [len(rows), d]."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), self.parts[0].shape[1])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        part = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat), self.shape[1]), dtype=np.float32)
        for j in np.unique(part):
            sel = part == j
            out[sel] = self.parts[j][flat[sel] - self.offsets[j]]
        return out.reshape(*rows.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(p, dtype=np.float32) for p in self.parts])
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, size: int):
        """(start, float32 block) over every row, `size` rows at a time."""
        for offset, part in zip(self.offsets, self.parts):
            for a in range(0, len(part), size):
                yield int(offset + a), np.ascontiguousarray(part[a:a + size], dtype=np.float32)


class DenseRetriever:
    """Inner-product search over L2-normalised embeddings (= cosine similarity).

    `build=False` loads the encoder and names the caches but encodes nothing: what `encode_shard`
    (one shard of `rag-lab index --shard i/n`, or of a Ray worker) needs."""

    def __init__(self, passages: Sequence[Passage] | Corpus, encoder: str = "all-minilm-l6-v2", query_prefix: str = "",
                 passage_prefix: str = "", max_length: int = 256, index_factory: str = "Flat",
                 search_params: str = "", batch_size: int = 64, cache_dir: Path | None = None,
                 show_progress: bool = True, model=None, query_encoder: str = "", embedding_dtype: str = "float32",
                 chunk: int = ENCODE_CHUNK, build: bool = True, encoder_backend: str = "sentence-transformers"):
        if not len(passages):
            raise ValueError("DenseRetriever needs a non-empty corpus")
        if embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"retriever.embedding_dtype {embedding_dtype!r}: choose one of {', '.join(EMBEDDING_DTYPES)}")

        self.passages: Corpus = as_corpus(passages)
        self.encoder_name = encoder
        if encoder_backend not in ENCODER_BACKENDS:
            raise ValueError(f"retriever.encoder_backend {encoder_backend!r}: choose one of {', '.join(ENCODER_BACKENDS)}")
        self.encoder_backend = encoder_backend
        self.model = model if model is not None else ENCODER_BACKENDS[encoder_backend](encoder, max_length)
        self.model.max_seq_length = max_length
        self.params = {"encoder": model_fingerprint(resolve_model(encoder)) if model is None else _module_fingerprint(model),
                       "query_prefix": query_prefix, "passage_prefix": passage_prefix, "max_length": max_length}
        if encoder_backend != "sentence-transformers":  # the default stays out of the key: older caches stay valid
            self.params["encoder_backend"] = f"{encoder_backend}-{self.model.compute_type}"
        if embedding_dtype != "float32":  # float32 (the default) stays out of the key: older caches stay valid
            self.params["embedding_dtype"] = embedding_dtype
        self.dtype = EMBEDDING_DTYPES[embedding_dtype]
        # a query encoder of its own (trained end to end) reads the questions; the passages keep `encoder`'s embeddings
        self.query_model = self.model
        if query_encoder:
            self.query_model = load_sentence_encoder(query_encoder)
            self.query_model.max_seq_length = max_length
            self.params["query_encoder"] = model_fingerprint(resolve_model(query_encoder))
        self.index_factory, self.search_params = index_factory, search_params
        self.batch_size, self.show_progress = batch_size, show_progress
        self._corpus_hash = self.passages.fingerprint
        self.cache_dir = retriever_cache_dir(cache_dir)
        self.store = EmbeddingStore(self.cache_dir / f"emb-{self._embedding_key()[:16]}", len(self.passages), chunk)
        self.cache_hit = {"embeddings": False, "index": False}
        self.build: dict | None = None  # {"kind", "seconds", "flops"} when this process encoded the corpus (timings.csv)
        if build:
            check_faiss_settings(self._dimension(), index_factory, search_params)  # before the corpus is encoded
            self.embeddings = self._load_or_encode()
            self.index = self._load_or_build_index()

    def _dimension(self) -> int:
        return int(np.asarray(self.model.encode(["dimension probe"])).shape[-1])

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

    def _encode_rows(self, start: int, stop: int) -> np.ndarray:
        """One chunk: the passages of rows [start, stop) in a single encoder call (its own batch bar: a
        chunk of 131,072 passages is most of an hour on a laptop CPU)."""
        return self.encode(self.passages.texts(start, stop, self.params["passage_prefix"]), progress=self.show_progress)

    def encode_shard(self, shard: int, n_shards: int) -> Path | None:
        """Encode shard `shard` of `n_shards` (skipped when complete): one worker's part of the corpus.
        None when the shard holds no rows (more shards than encoder chunks)."""
        start, stop = shard_rows(len(self.passages), shard, n_shards, self.store.chunk)
        if start == stop:
            return None
        return self.store.write_shard(start, stop, self._encode_rows, self.dtype, self.show_progress)

    def _load_or_encode(self) -> np.ndarray | ShardedEmbeddings:
        shards, missing = self.store.walk()  # checksum-verified shards; a damaged one is reported, deleted and re-encoded
        if not missing:
            self.cache_hit["embeddings"] = True
        else:
            t0 = time.perf_counter()
            for start, stop in missing:
                self.store.write_shard(start, stop, self._encode_rows, self.dtype, self.show_progress)
            n = sum(b - a for a, b in missing)
            int8 = self.encoder_backend == "ctranslate2"
            self.build = {"kind": f"dense {Path(self.encoder_name).name}" + (" (ctranslate2 int8)" if int8 else ""),
                          "seconds": time.perf_counter() - t0, "flops": self._encoding_flops(missing),
                          "precision": "int8" if int8 else "float32", "note": f"{n} passages encoded"}
            shards = self.store.shards()
        parts = [np.load(d / "emb.npy", mmap_mode="r") for _, _, d in shards]
        return parts[0] if len(parts) == 1 else ShardedEmbeddings(parts)

    def _encoding_flops(self, ranges, sample: int = 20_000) -> float | None:
        """2 N per token over the tokens the encoder saw (truncated at max_length; padding not counted):
        counted exactly up to `sample` passages, estimated from `sample` evenly spaced ones beyond (a
        second tokenisation of a 21M-passage corpus would cost as much as the encoder's own)."""
        try:
            tokenizer = self.model.tokenizer
            n_params = self.model.n_params if hasattr(self.model, "n_params") else count_params(self.model[0].auto_model)
        except (AttributeError, IndexError, TypeError):  # an encoder that is not a transformers module
            return None
        if not n_params:
            return None
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        picked = rows if len(rows) <= sample else rows[np.linspace(0, len(rows) - 1, sample).astype(np.int64)]
        prefix = self.params["passage_prefix"]
        texts = [prefix + passage_text(p) for p in self.passages.take(picked)]
        tokens = sum(map(len, tokenizer(texts, truncation=True, max_length=self.params["max_length"])["input_ids"]))
        return encoder_flops(n_params, tokens * len(rows) / len(picked))

    def _load_or_build_index(self) -> faiss.Index:
        folder = self.cache_dir / f"faiss-{stable_hash([self._embedding_key(), self.index_factory])[:16]}"
        if folder.exists() and verified_folder(folder):
            self.cache_hit["index"] = True
        else:
            with atomic_dir(folder) as tmp:
                faiss.write_index(build_faiss_index(self.embeddings, self.index_factory, self.show_progress),
                                  str(tmp / "index.faiss"))
                write_manifest(tmp)
        index = read_index(folder / "index.faiss")
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(index, self.search_params)
        return index

    def retrieve(self, questions: Sequence[QAExample], k: int) -> list[list[Hit]]:
        k = min(check_k(k), len(self.passages))
        queries = self.encode(check_questions(questions), self.params["query_prefix"], self.show_progress and len(questions) > 256,
                              self.query_model)
        scores, indices = self.index.search(queries, k)
        return hits_from_arrays(self.passages, indices, scores)


def read_index(path: Path) -> faiss.Index:
    """A FAISS index file, memory-mapped where FAISS can (IVF inverted lists, flat codes): the
    vectors stay on disk and pages come in as searches touch them."""
    # IVF indexes (fourcc "Iw..") map their inverted lists with IO_FLAG_MMAP (OnDiskInvertedLists);
    # flat codes (Flat, HNSW's storage) map with IO_FLAG_MMAP_IFC; what cannot be mapped is read whole
    with open(path, "rb") as f:
        ivf = f.read(2) == b"Iw"
    try:
        return faiss.read_index(str(path), (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path))


def check_faiss_settings(dim: int, factory: str, search_params: str) -> None:
    """An empty index of `factory` over `dim` dimensions, with `search_params` applied: what FAISS rejects
    is an error naming the key before an hour of encoding, not after."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrieverSettingError(f"retriever.index_factory {factory!r}: FAISS rejects it over {dim} dimensions "
                                    f"({_faiss_message(e)})") from None
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as e:
            raise RetrieverSettingError(f"retriever.search_params {search_params!r}: FAISS rejects it for {factory!r} "
                                        f"({_faiss_message(e)})") from None


def _faiss_message(error: Exception) -> str:
    """FAISS's reason, without the C++ function and source line that precede it."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(error).strip().splitlines()[-1])


def build_faiss_index(vectors, factory: str = "Flat", show_progress: bool = False, chunk: int = 65_536,
                      train_rows: int = TRAIN_ROWS, seed: int = 0) -> faiss.Index:
    """`faiss.index_factory` with inner product over `vectors` (an array, memory-mapped or not, or
    `ShardedEmbeddings`); an IVF/PQ index trains on a seeded sample of at most max(`train_rows`,
    64 per list) rows (all of them when fewer), then the vectors are added `chunk` rows at a time."""
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrieverSettingError(f"retriever.index_factory {factory!r}: FAISS rejects it ({_faiss_message(e)})") from None
    blocks = vectors.chunks(chunk) if isinstance(vectors, ShardedEmbeddings) else (
        (a, np.ascontiguousarray(vectors[a:a + chunk], dtype=np.float32)) for a in range(0, n, chunk))
    if not index.is_trained:
        try:
            lists = faiss.extract_index_ivf(index).nlist
        except RuntimeError:  # not an IVF index (e.g. PQ alone)
            lists = 0
        size = min(n, max(train_rows, 64 * lists))
        rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False)) if size < n else np.arange(n)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for _, block in tqdm(blocks, total=-(-n // chunk), desc=f"FAISS {factory}", disable=not show_progress):
        index.add(block)
    return index


def _module_fingerprint(model) -> str:
    """For an in-memory encoder (tests): a hash of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()
