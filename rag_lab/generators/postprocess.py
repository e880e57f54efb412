"""From a model's raw continuation to a short answer. The raw text is always kept beside it."""
from __future__ import annotations

import re
from typing import Sequence

_QUOTES = "\"'“”‘’`*"
# The prompt numbers its passages "[1] Title: text"; readers copy the marker ("[2] Paris", "Paris [1]").
_PASSAGE_MARKER = re.compile(r"\s*\[\d{1,3}\]\s*:?\s*")


def clean_answer(raw: str, strip_prefixes: Sequence[str] = ("the answer is", "answer:")) -> str:
    """First non-empty line, the prompt's passage markers ("[1]") and boilerplate prefixes removed
    (case-insensitive), outer quotes and a final full stop stripped. "The answer is Paris." -> "Paris";
    "[2] Paris [1]" -> "Paris"."""
    line = next((l.strip() for l in raw.splitlines() if l.strip()), "")
    line = _PASSAGE_MARKER.sub(" ", line).strip()
    changed = True
    while changed:  # prefixes may stack: "Answer: The answer is Paris"
        changed = False
        for prefix in strip_prefixes:
            if prefix and line.lower().startswith(prefix.lower()):
                line = line[len(prefix):].lstrip(" :,-")
                changed = True
    line = line.strip().strip(_QUOTES).strip()
    return re.sub(r"[.。]+$", "", line).strip()
