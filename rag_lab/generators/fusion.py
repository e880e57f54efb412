"""Readers that combine several passages by probability rather than by concatenation.

    log p(y|x)   = logsumexp_z [ log p_eta(z|x) + log p_theta(y|x,z) ]          RAG-Sequence
    log p(y_t|.) = logsumexp_z [ log p_eta(z|x) + log p_theta(y_t|x,z,y_<t) ]   RAG-Token

p_eta(z|x) is the retriever's softmax over the top-k scores divided by `retriever.temperature`; the
runner hands its logits over as `doc_logits`, one row per question. Every reader here has the
interface of the other generators (`generate(examples, contexts, show_progress, done, on_batch,
doc_logits)`), so the runner, its caches and its resume treat them alike.

    token_logp, mask = answer_logprobs(model, tokenizer, prompts, answers)   # the scoring primitive
    gen = RagSequenceGenerator(model, tokenizer, builder, decoding="thorough")
    preds = gen.generate(questions, passages, doc_logits=logits)
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch

from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.hf import HFGenerator, resumable_batches
from rag_lab.generators.prompts import Prompt, PromptBuilder


def _exact(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the log-softmax; float32 and float64 kept as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def marginal_logprob(doc_logits: torch.Tensor, seq_logp: torch.Tensor) -> torch.Tensor:
    """log sum_z p_eta(z|x) p_theta(y|x,z), in log space.

    doc_logits [..., k]: retriever scores / temperature; seq_logp [..., k]: log p_theta(y|x,z) per passage.
    Returns [...]. A passage with seq_logp = -inf (not scored) contributes nothing."""
    return torch.logsumexp(torch.log_softmax(doc_logits, dim=-1) + seq_logp, dim=-1)


# ---------------------------------------------------------------- scoring answers

def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], add_special_tokens: bool = False,
                    decoder_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta(answer token | prompt, earlier answer tokens) for each (prompt, answer) pair.

    The target is the answer's tokens + EOS, as in fine-tuning. Returns (logp [N, M], mask [N, M])
    with M the longest target; logp is 0 where mask is False. Decoder-only models read the pairs
    left-padded (positions from the mask, so padding changes nothing) and compute logits only at
    the last M + 1 positions; the targets are right-aligned. Encoder-decoder models read the prompt
    in the encoder and the target in the decoder; the targets are left-aligned. Within one question
    every passage shares the answer, so its rows share the mask."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    targets = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    m = max(map(len, targets))
    if not decoder_only:
        enc = tokenizer(list(prompts), padding=True, return_tensors="pt").to(device)
        labels = torch.full((len(targets), m), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            labels[i, :len(t)] = torch.tensor(t)
        logits = model(**enc, labels=labels.to(device)).logits
        mask = labels != -100
        logp = torch.log_softmax(_exact(logits), -1).gather(-1, labels.clamp(min=0).to(device)[..., None]).squeeze(-1)
        return logp * mask.to(device), mask.to(device)
    seqs = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] + t for p, t in zip(prompts, targets)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], attention[i, width - len(s):] = torch.tensor(s), 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=m + 1).logits[:, :-1]
    lengths = torch.tensor([len(t) for t in targets], device=device)
    mask = torch.arange(m, device=device)[None, :] >= (m - lengths)[:, None]
    logp = torch.log_softmax(_exact(logits), -1).gather(-1, ids[:, -m:, None]).squeeze(-1)
    return logp * mask, mask


# ---------------------------------------------------------------- marginalising readers

class _PerPassageGenerator(HFGenerator):
    """Shared by RAG-Sequence and RAG-Token: one prompt per (question, passage), batches of questions."""

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, decoder_only: bool = True, **kwargs):
        if decoder_only and tokenizer.padding_side != "left":
            raise ValueError("decoder-only batched generation needs tokenizer.padding_side == 'left'")
        if not decoder_only and prompt_builder.use_chat:  # the chat decision is prompt_builder's
            raise ValueError("an encoder-decoder reader reads plain-text prompts: build them with prompt_builder(cfg) for "
                             "generator.kind: seq2seq")
        self.is_decoder_only = decoder_only
        super().__init__(model, tokenizer, prompt_builder, **kwargs)

    def passage_prompts(self, example: QAExample, passages: Sequence[Passage]) -> list[Prompt]:
        return [self.builder.rag(example, [p]) for p in passages]

    def generate(self, examples: Sequence[QAExample], contexts: Sequence[Sequence[Passage]] | None = None,
                 show_progress: bool = False, done: Mapping[int, str] | None = None,
                 on_batch: Callable[[list[int], list[str]], None] | None = None,
                 doc_logits: Sequence[Sequence[float]] | None = None) -> list[dict]:
        """Predictions in input order; `doc_logits[i]` weighs the passages of `contexts[i]`. Batches
        hold `batch_size // k` questions (each read with each of its k passages); resumable."""
        if contexts is None or doc_logits is None:
            raise ValueError(f"{type(self).__name__} marginalises over passages: it needs contexts and doc_logits")
        if not (len(examples) == len(contexts) == len(doc_logits)):
            raise ValueError(f"{len(examples)} examples, {len(contexts)} contexts, {len(doc_logits)} doc_logits rows")
        prompts = [self.passage_prompts(e, ctx) for e, ctx in zip(examples, contexts)]
        k = max([len(c) for c in contexts] + [1])
        sizes = [sum(p.n_tokens for p in row) for row in prompts]
        raws = resumable_batches(sizes, max(1, self.batch_size // k), lambda batch: self.decode(
            [prompts[i] for i in batch], [examples[i] for i in batch], [doc_logits[i] for i in batch]), done, on_batch, show_progress)
        first = [row[0] if row else self.builder.closed_book(e) for row, e in zip(prompts, examples)]
        preds = self.predictions(examples, first, raws)
        for pred, row in zip(preds, prompts):
            pred["prompt_tokens"], pred["n_passages"] = sum(p.n_tokens for p in row), len(row)
            pred["truncated"] = any(p.truncated for p in row)
        return preds

    def decode(self, prompts: list[list[Prompt]], examples: list[QAExample], doc_logits: list[Sequence[float]]) -> list[str]:
        raise NotImplementedError


def first_line(text: str) -> str:
    """What greedy decoding keeps: the continuation up to its first newline, stripped."""
    return text.lstrip("\n").split("\n", 1)[0].strip()


def pick_candidate(candidates: Sequence[str], seq_logp: torch.Tensor, doc_logits: Sequence[float]) -> str:
    """The candidate with the highest marginal sum_z p_eta(z|x) p_theta(y|x,z); seq_logp [U, k] holds
    log p_theta(candidate u | x, z), -inf where not scored. Ties: the earlier candidate."""
    marginal = marginal_logprob(torch.tensor(list(doc_logits), dtype=torch.float64), seq_logp.double())
    return candidates[int(torch.argmax(marginal))]  # argmax returns the first maximum


class RagSequenceGenerator(_PerPassageGenerator):
    """RAG-Sequence decoding. `thorough` (the paper's): a greedy candidate from each passage, every
    candidate scored against every passage, the argmax of the marginal kept. `fast`: a candidate is
    scored only against the passages that produced it (p_theta(y|x,z) taken as 0 elsewhere).

    Decoder-only readers read each (question, passage) prompt once: the greedy candidates and every
    candidate's score continue from that prompt's key-value cache, so scoring U candidates costs
    their few tokens, not U more passes over the prompts (`answer_logprobs` gives the same scores
    from scratch: tested)."""

    def __init__(self, model, tokenizer, prompt_builder: PromptBuilder, decoding: str = "thorough", **kwargs):
        if decoding not in ("thorough", "fast"):
            raise ValueError(f"RAG-Sequence decoding {decoding!r}: thorough or fast")
        self.decoding = decoding
        super().__init__(model, tokenizer, prompt_builder, **kwargs)

    @torch.inference_mode()
    def decode(self, prompts, examples, doc_logits) -> list[str]:
        flat = [p for row in prompts for p in row]
        if not flat:
            return [""] * len(prompts)
        if self.is_decoder_only:
            state = self.prefill([p.text for p in flat])
            raws = self.tokenizer.batch_decode(self.greedy(state), skip_special_tokens=True)
        else:
            state, raws = None, self.generate_batch(flat)
        cands = [first_line(r) for r in raws]
        plan, pairs, start = [], [], 0
        for row in prompts:  # which (candidate, passage) pairs each question scores
            mine = cands[start:start + len(row)]
            unique = list(dict.fromkeys(mine))
            todo = [(u, j) for u in range(len(unique)) for j in range(len(row)) if self.decoding == "thorough" or mine[j] == unique[u]]
            plan.append((unique, len(row), todo, len(pairs)))
            pairs += [(start + j, unique[u]) for u, j in todo]
            start += len(row)
        scores = self.pair_scores(state, flat, pairs)
        out = []
        for unique, k, todo, first in plan:
            if not k:
                out.append("")
                continue
            seq = torch.full((len(unique), k), float("-inf"), dtype=torch.float64)
            for n, (u, j) in enumerate(todo):
                seq[u, j] = scores[first + n]
            out.append(pick_candidate(unique, seq, doc_logits[len(out)]))
        return out

    def pair_scores(self, state, flat: list[Prompt], pairs: list[tuple[int, str]]) -> list[float]:
        """log p_theta(candidate + EOS | prompt) for each (prompt index, candidate) pair."""
        out: list[float] = []
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            if state is not None:
                out += self.cached_scores(state, chunk)
            else:
                logp, _ = answer_logprobs(self.model, self.tokenizer, [flat[i].text for i, _ in chunk], [c for _, c in chunk],
                                          not self.builder.use_chat, self.is_decoder_only)
                out += logp.sum(-1).double().tolist()
        return out

    # ------------------------------------------------------------ decoder-only: one pass over each prompt

    def prefill(self, texts: list[str]) -> dict:
        return prefill(self, texts)

    def greedy(self, state: dict) -> list[list[int]]:
        """Greedy continuations of every prompt (on a copy of the cache), stopped at EOS or a newline."""
        cache = copy.deepcopy(state["cache"])
        mask, last, nxt = state["mask"], state["last"], state["first"].argmax(-1)
        tokens: list[list[int]] = [[] for _ in range(mask.shape[0])]
        for step in range(self.max_new_tokens):
            if _append(self.tokenizer, tokens, nxt) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], -1)
            last = last + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
        return tokens

    def cached_scores(self, state: dict, pairs: list[tuple[int, str]]) -> list[float]:
        """log p_theta(candidate + EOS | prompt) continuing from each prompt's cache."""
        rows = torch.tensor([i for i, _ in pairs], device=state["mask"].device)
        targets = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id] for _, c in pairs]
        first = state["first"][rows, torch.tensor([t[0] for t in targets], device=rows.device)].double()
        width = max(map(len, targets)) - 1
        if width == 0:
            return first.tolist()
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id, dtype=torch.long, device=rows.device)
        new = torch.zeros((len(pairs), width), dtype=torch.long, device=rows.device)
        for n, t in enumerate(targets):  # right-padded: padding after a candidate never reaches its tokens
            ids[n, :len(t) - 1], new[n, :len(t) - 1] = torch.tensor(t[:-1]), 1
        cache = copy.deepcopy(state["cache"])
        for layer in cache.layers:
            layer.batch_select_indices(rows)
        mask = torch.cat([state["mask"][rows], new], -1)
        positions = state["last"][rows][:, None] + 1 + torch.arange(width, device=rows.device)[None, :]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
        nexts = torch.full_like(ids, 0)
        for n, t in enumerate(targets):
            nexts[n, :len(t) - 1] = torch.tensor(t[1:])
        rest = torch.log_softmax(_exact(logits), -1).gather(-1, nexts[..., None]).squeeze(-1).double()
        return (first + (rest * new).sum(-1)).tolist()


def prefill(generator: HFGenerator, texts: list[str]) -> dict:
    """Read left-padded prompts once with a decoder-only model: their mask, last positions, the
    log-distribution of the first new token, and the key-value cache (counted in the generator's stats)."""
    device = next(generator.model.parameters()).device
    enc = generator.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not generator.builder.use_chat).to(device)
    generator.stats["prompt_tokens"] += int(enc["attention_mask"].sum())
    generator.stats["padded_tokens"] += int(enc["attention_mask"].numel())
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = generator.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return {"mask": mask, "last": positions[:, -1], "first": torch.log_softmax(_exact(out.logits[:, -1]), -1),
            "cache": out.past_key_values}


def _append(tokenizer, tokens: list[list[int]], nxt: torch.Tensor) -> bool:
    """Append each row's next token unless the row has finished; True once every row has."""
    for row, t, done in zip(tokens, nxt.tolist(), _stopped(tokenizer, tokens)):
        if not done:
            row.append(t)
    return all(_stopped(tokenizer, tokens))


def _stopped(tokenizer, tokens: list[list[int]]) -> list[bool]:
    """Which continuations are finished: EOS emitted, or a newline after the first non-newline text."""
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [(tokenizer.eos_token_id in t) or ("\n" in s.lstrip("\n")) for t, s in zip(tokens, texts)]


class RagTokenGenerator(_PerPassageGenerator):
    """RAG-Token greedy decoding: at every step the next-token distributions of the k passages are
    mixed with weights p_eta(z|x) and the argmax token is appended to all k."""

    @torch.inference_mode()
    def decode(self, prompts, examples, doc_logits) -> list[str]:
        k = max(len(r) for r in prompts)
        if any(len(r) != k for r in prompts):  # short rows: group by size so each batch is rectangular
            return [self.decode([r], [e], [d])[0] for r, e, d in zip(prompts, examples, doc_logits)]
        if k == 0:
            return [""] * len(prompts)
        weights = torch.log_softmax(torch.tensor([list(d) for d in doc_logits], dtype=torch.float32), -1)
        step = self._decoder_steps if self.is_decoder_only else self._seq2seq_steps
        tokens = step([p.text for row in prompts for p in row], len(prompts), k, weights)
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def _mix(self, logits: torch.Tensor, b: int, k: int, weights: torch.Tensor) -> torch.Tensor:
        """argmax_v logsumexp_z [log p_eta(z) + log p(v | z)] for each question: [b]."""
        logp = torch.log_softmax(logits.float(), -1).view(b, k, -1)
        return torch.logsumexp(weights.to(logp.device)[..., None] + logp, dim=1).argmax(-1)

    def _decoder_steps(self, texts: list[str], b: int, k: int, weights: torch.Tensor) -> list[list[int]]:
        state = prefill(self, texts)
        attention, last, cache, logp = state["mask"], state["last"], state["cache"], state["first"]
        tokens: list[list[int]] = [[] for _ in range(b)]
        for _ in range(self.max_new_tokens):
            nxt = self._mix(logp, b, k, weights)
            if _append(self.tokenizer, tokens, nxt):
                break
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], -1)
            last = last + 1
            out = self.model(input_ids=nxt.repeat_interleave(k)[:, None], attention_mask=attention, position_ids=last[:, None],
                             past_key_values=cache, use_cache=True)
            logp = out.logits[:, -1]
        return tokens

    def _seq2seq_steps(self, texts: list[str], b: int, k: int, weights: torch.Tensor) -> list[list[int]]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(device)
        encoded = self.model.get_encoder()(**enc)
        start = self.model.config.decoder_start_token_id
        dec = torch.full((b * k, 1), start, dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        for _ in range(self.max_new_tokens):
            logits = self.model(encoder_outputs=encoded, attention_mask=enc["attention_mask"], decoder_input_ids=dec).logits[:, -1]
            nxt = self._mix(logits, b, k, weights)
            if _append(self.tokenizer, tokens, nxt):
                break
            dec = torch.cat([dec, nxt.repeat_interleave(k)[:, None]], -1)
        return tokens
