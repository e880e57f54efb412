"""Split articles into passages of at most 100 words (the DPR convention).

DPR cuts Wikipedia into consecutive 100-word blocks. We keep the ≤100-word bound but
spread the words evenly over ceil(n/100) blocks, so a 110-word summary becomes two
55-word passages instead of a 100-word one and a 10-word scrap that retrieves badly.
"""
from __future__ import annotations

import math

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
