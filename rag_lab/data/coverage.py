"""Does a gold answer occur anywhere in a corpus? (DPR has-answer semantics, at corpus scale.)

Checking 5k questions against 10k+ passages one by one with `metrics.has_answer` takes
minutes. Instead we normalise the corpus once into one flat token list (passages
separated by a sentinel token that normalisation can never produce), index the
positions of each token, and verify candidate positions of an answer's rarest token.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from rag_lab.metrics import normalize_answer

_SENTINEL = "\x00"  # normalize_answer keeps only words, so no token equals this


class AnswerOccurrenceIndex:
    """Token-position index of a normalised corpus for fast "answer occurs in corpus" checks."""

    def __init__(self, texts: Iterable[str]):
        self.tokens: list[str] = []
        for text in texts:
            self.tokens.extend(normalize_answer(text).split())
            self.tokens.append(_SENTINEL)
        positions: dict[str, list[int]] = defaultdict(list)
        for pos, tok in enumerate(self.tokens):
            positions[tok].append(pos)
        self.positions = dict(positions)

    def contains(self, answer: str) -> bool:
        """True if the normalised answer occurs as a contiguous token span within one passage."""
        needle = normalize_answer(answer).split()
        if not needle:  # an answer that normalises to nothing matches nothing
            return False
        if any(tok not in self.positions for tok in needle):
            return False
        # anchor on the rarest token: fewest candidate positions to verify
        anchor = min(range(len(needle)), key=lambda i: len(self.positions[needle[i]]))
        n = len(needle)
        for pos in self.positions[needle[anchor]]:
            start = pos - anchor
            if start >= 0 and self.tokens[start : start + n] == needle:
                return True
        return False

    def contains_any(self, answers: Sequence[str]) -> bool:
        return any(self.contains(a) for a in answers)
