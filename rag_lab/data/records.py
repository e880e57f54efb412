"""The data contract: one QA example, one passage. Same field names everywhere.

    QA example: {"id": "nq-dev-0", "question": "who ...", "answers": ["...", "..."]}
    Passage:    {"id": "Eiffel Tower#0", "title": "Eiffel Tower", "text": "..."}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rag_lab.io import DataError


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]
    # True/False when known (nq-mini marks it); None for datasets that don't say.
    answer_in_corpus: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        row = {"id": self.id, "question": self.question, "answers": list(self.answers)}
        if self.answer_in_corpus is not None:
            row["answer_in_corpus"] = self.answer_in_corpus
        return row


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passage_text(p: Passage) -> str:
    """How every component reads a passage: the title is part of it, as in DPR ("title. text")."""
    return f"{p.title}. {p.text}" if p.title else p.text


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
    in_corpus = row.get("answer_in_corpus")
    return QAExample(
        id=str(row.get("id", default_id)),
        question=question.strip(),
        answers=tuple(answers),
        answer_in_corpus=None if in_corpus is None else bool(in_corpus),
    )


def passage_from_row(row: dict[str, Any], where: str, default_id: str) -> Passage:
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: corpus row has no 'text' (keys: {sorted(row)})")
    title = row.get("title", "")
    return Passage(id=str(row.get("id", default_id)), title=str(title or ""), text=text)
