"""The data contract: one QA example, one passage. Same field names everywhere.

    QA example: {"id": "nq-dev-0", "question": "who ...", "answers": ["...", "..."]}
    Passage:    {"id": "Eiffel Tower#0", "title": "Eiffel Tower", "text": "..."}
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rag_lab.io import DataError
from rag_lab.metrics import passage_text  # noqa: F401  (the text every component reads; defined beside the answer test)


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]
    # True/False when known (nq-mini marks it); None for datasets that don't say.
    answer_in_corpus: bool | None = None
    # The id of the passage a human annotator marked as holding the answer (NQ's long answer), when the
    # dataset has one: what the gold-passage oracle reads. None: no annotated passage (or not annotated).
    gold_passage_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        row = {"id": self.id, "question": self.question, "answers": list(self.answers)}
        if self.answer_in_corpus is not None:
            row["answer_in_corpus"] = self.answer_in_corpus
        if self.gold_passage_id is not None:
            row["gold_passage_id"] = self.gold_passage_id
        return row


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qa_from_row(row: dict[str, Any], where: str, default_id: str) -> QAExample:
    """Build a QAExample from a raw row; `where` ("file:line") goes into every error.

    Accepts `answers` (list) or NQ-open's `answer` (list or str).
    """
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: QA row has no 'question' (keys: {sorted(row)})")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, (list, tuple)):
        raise DataError(f"{where}: QA row has no 'answers' or 'answer' list (keys: {sorted(row)})")
    if not answers:
        raise DataError(f"{where}: QA row has an empty answers list")
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: answers must be strings, got {answers!r}")
    in_corpus = _null_to_none(row.get("answer_in_corpus"))
    if in_corpus is not None and not isinstance(in_corpus, (bool, np.bool_)):
        raise DataError(f"{where}: 'answer_in_corpus' must be true, false or null, got {in_corpus!r}")
    gold = _null_to_none(row.get("gold_passage_id"))
    if gold is not None and (not isinstance(gold, str) or not gold.strip()):
        raise DataError(f"{where}: 'gold_passage_id' must be a passage id (a non-empty string) or null, got {gold!r}")
    for key, value in [("question", question), *(("answers", a) for a in answers), ("gold_passage_id", gold or "")]:
        _check_unicode(value, where, key)
    return QAExample(
        id=_row_id(row, where, default_id),
        question=question.strip(),
        answers=tuple(answers),
        answer_in_corpus=None if in_corpus is None else bool(in_corpus),
        gold_passage_id=gold,
    )


def passage_from_row(row: dict[str, Any], where: str, default_id: str) -> Passage:
    """A passage from a raw row. The null rule, the same in every loader: a missing or null
    `title` is the empty string (the passage reads as its text alone); a null `text` or `id`
    is an error; a title that is not a string is an error (never its str(), e.g. "nan")."""
    text = _null_to_none(row.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: corpus row has no 'text' (keys: {sorted(row)})")
    title = _null_to_none(row.get("title"))
    if title is not None and not isinstance(title, str):
        raise DataError(f"{where}: 'title' must be a string or null, got {title!r}")
    _check_unicode(text, where, "text")
    _check_unicode(title or "", where, "title")
    return Passage(id=_row_id(row, where, default_id), title=title or "", text=text)


def _check_unicode(value: str, where: str, key: str) -> None:
    """A lone surrogate (a JSON "\\ud800" without its pair) is not text: it would fail only later, when a
    prediction or an Arrow corpus is written, far from the file that holds it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {key!r} holds a lone surrogate {value[e.start]!r} at character {e.start}, "
                        "which is not Unicode text (fix the escape sequence in the file)") from None


def _null_to_none(value):
    """None for the ways a file writes 'no value': JSON null, and pandas' NaN / None / NaT (parquet)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return None if type(value).__name__ in ("NaTType", "NAType") else value


def _row_id(row: dict[str, Any], where: str, default_id: str) -> str:
    """The row's `id` as a string (a row without the key gets `default_id`); a null or empty id is an error."""
    if "id" not in row:
        return default_id
    value = _null_to_none(row["id"])
    if value is None or str(value).strip() == "":
        raise DataError(f"{where}: 'id' is null or empty")
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and value.is_integer():  # pandas reads an int column with a null as floats
        value = int(value)
    _check_unicode(str(value), where, "id")
    return str(value)
