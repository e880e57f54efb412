"""Split articles into passages of at most 100 words (the DPR convention), and passages into
sentence windows (fewer prompt tokens per answer-bearing passage, for readers that pay per token).

DPR cuts Wikipedia into consecutive 100-word blocks. We keep the ≤100-word bound but
spread the words evenly over ceil(n/100) blocks, so a 110-word summary becomes two
55-word passages instead of a 100-word one and a 10-word scrap that retrieves badly.
"""
from __future__ import annotations

import math
import re

from rag_lab.data.records import Passage


def chunk_words(text: str, max_words: int = 100) -> list[str]:
    """Split `text` on whitespace into ceil(n/max_words) near-equal chunks of ≤ max_words words."""
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    words = text.split()
    if not words:
        return []
    n_chunks = math.ceil(len(words) / max_words)
    base, extra = divmod(len(words), n_chunks)
    chunks, start = [], 0
    for i in range(n_chunks):
        size = base + (1 if i < extra else 0)  # the first `extra` chunks take one more word
        chunks.append(" ".join(words[start : start + size]))
        start += size
    return chunks


def article_to_passages(title: str, text: str, max_words: int = 100) -> list[Passage]:
    """Passages with stable ids `<title>#<index>` (the title is kept on every passage)."""
    return [Passage(id=f"{title}#{i}", title=title, text=chunk) for i, chunk in enumerate(chunk_words(text, max_words))]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")  # ". The", "! 1998": a new sentence starts


def sentence_windows(text: str, max_words: int) -> list[str]:
    """Consecutive sentences packed into windows of at most `max_words` words; a sentence longer
    than that is cut into near-equal pieces (`chunk_words`). Windows never cross a passage."""
    windows: list[list[str]] = [[]]
    for sentence in _SENTENCE_END.split(text.strip()):
        for piece in chunk_words(sentence, max_words):
            words = piece.split()
            if windows[-1] and len(windows[-1]) + len(words) > max_words:
                windows.append([])
            windows[-1].extend(words)
    return [" ".join(w) for w in windows if w]


def window_passages(passages: list[Passage], max_words: int) -> list[Passage]:
    """Each passage split into sentence windows of at most `max_words` words, ids `<passage id>~<j>`,
    the title kept on every window: the same answer-bearing text in fewer prompt tokens."""
    return [Passage(id=f"{p.id}~{j}", title=p.title, text=w)
            for p in passages for j, w in enumerate(sentence_windows(p.text, max_words))]
