"""Prompts: closed-book and RAG, optional few-shot demonstrations, and context truncation
that cuts passage tokens — never the question — to fit the input budget."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from rag_lab.data.records import Passage, QAExample
from rag_lab.io import UserError


class PromptTooLong(UserError, ValueError):
    """The question's prompt does not fit `generator.max_input_tokens` (raised while the prompts are
    built, before any generation): the config's to fix, so one line, not a traceback."""

    def __init__(self, limit: int, question_id: str, n_tokens: int, what: str):
        super().__init__(f"generator.max_input_tokens = {limit}: question {question_id!r}: {what} is already {n_tokens} "
                         f"tokens and over it (passages are cut to fit, never the question): raise "
                         f"generator.max_input_tokens to more than {n_tokens}, or shorten the template")

MIN_PASSAGE_TOKENS = 8  # a passage cut shorter than this is dropped rather than kept as a scrap


@dataclass
class Prompt:
    text: str  # what the tokenizer sees (chat template applied, if any)
    n_tokens: int
    truncated: bool  # some passage tokens were cut (or passages dropped) to fit
    n_passages: int  # passages (whole or cut) that made it into the prompt


def format_passage(i: int, p: Passage, text: str | None = None) -> str:
    return f"[{i}] {p.title}: {text if text is not None else p.text}"


def sample_demonstrations(train: Sequence[QAExample], n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[QAExample]:
    """n demonstrations from the train split, drawn once with a fixed seed (the same for every question)."""
    pool = [e for e in train if e.id not in exclude]
    return random.Random(seed).sample(pool, n) if n else []


class PromptBuilder:
    """Builds prompts for one tokenizer: chat template when it has one (and `use_chat` is on), plain text otherwise."""

    def __init__(self, tokenizer, closed_book_template: str, rag_template: str, system_prompt: str = "",
                 demonstrations: Sequence[QAExample] = (), use_chat: bool = True, max_input_tokens: int = 1024,
                 max_context_tokens: int | None = None):
        if "{question}" not in closed_book_template:
            raise ValueError("closed_book_template must contain {question}")
        if "{question}" not in rag_template or "{context}" not in rag_template:
            raise ValueError("rag_template must contain {context} and {question}")
        self.tokenizer = tokenizer
        self.closed_book_template, self.rag_template = closed_book_template, rag_template
        self.system_prompt, self.demonstrations = system_prompt, list(demonstrations)
        # Chat mode on a tokenizer without a template falls back to plain prompts (documented).
        self.use_chat = use_chat and getattr(tokenizer, "chat_template", None) is not None
        self.max_input_tokens, self.max_context_tokens = max_input_tokens, max_context_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"])

    def render(self, user_message: str) -> str:
        """Wrap the final user message with the system prompt and demonstrations."""
        demos = [(self.closed_book_template.format(question=d.question), d.answers[0]) for d in self.demonstrations]
        if self.use_chat:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for q, a in demos:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": user_message})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = ([self.system_prompt] if self.system_prompt else []) + [f"{q} {a}" for q, a in demos] + [user_message]
        return "\n\n".join(parts)

    def closed_book(self, example: QAExample) -> Prompt:
        text = self.render(self.closed_book_template.format(question=example.question))
        n = self.count(text)
        if n > self.max_input_tokens:
            raise PromptTooLong(self.max_input_tokens, example.id, n, "the prompt")
        return Prompt(text, n, False, 0)

    def rag(self, example: QAExample, passages: Sequence[Passage]) -> Prompt:
        """Put as many passages as fit (in max_input_tokens, and in max_context_tokens when set); cut the
        first one that does not fit, drop the rest."""
        frame = self.render(self.rag_template.format(context="", question=example.question))
        budget = self.max_input_tokens - self.count(frame)
        if budget >= 0 and self.max_context_tokens is not None:
            budget = min(budget, self.max_context_tokens)
        if budget < 0:
            raise PromptTooLong(self.max_input_tokens, example.id, self.count(frame), "the prompt without passages")
        while True:  # tokenisation is not exactly additive: shrink the budget until the whole prompt fits
            context, truncated, used = self._fit(passages, budget)
            text = self.render(self.rag_template.format(context=context, question=example.question))
            n = self.count(text)
            if n <= self.max_input_tokens:
                return Prompt(text, n, truncated, used)
            budget -= n - self.max_input_tokens

    def _fit(self, passages: Sequence[Passage], budget: int) -> tuple[str, bool, int]:
        blocks, left = [], budget
        for i, p in enumerate(passages, start=1):
            block = format_passage(i, p)
            ids = self.tokenizer(("\n" if blocks else "") + block, add_special_tokens=False)["input_ids"]
            if len(ids) <= left:
                blocks.append(block)
                left -= len(ids)
                continue
            head = self.tokenizer(format_passage(i, p, ""), add_special_tokens=False)["input_ids"]
            keep = left - len(head) - 1
            if keep >= MIN_PASSAGE_TOKENS:
                text_ids = self.tokenizer(p.text, add_special_tokens=False)["input_ids"][:keep]
                blocks.append(format_passage(i, p, self.tokenizer.decode(text_ids).strip()))
            return "\n".join(blocks), True, len(blocks)
        return "\n".join(blocks), False, len(blocks)
