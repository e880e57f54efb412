"""QA metrics (EM, F1, answer match, DPR has_answer, recall@k) and the statistics
used to report them (bootstrap CIs, paired bootstrap test, exact McNemar).

Every scorer returns per-question arrays, never just means, so that every number we
report can carry a confidence interval and every comparison a paired test.

Normalisation is exactly the official SQuAD / NQ-open one (lower-case, strip ASCII
punctuation, drop the articles a/an/the, squeeze white space) so that our EM/F1 match
published numbers. Consequences worth knowing, all shared with the official script:
  - only `string.punctuation` (ASCII) is removed: an en dash "–", curly quotes "’"
    or "«" survive, so "1939–1945" is one token;
  - no Unicode folding: "Café" stays "café" and does not equal "cafe";
  - a gold answer that normalises to "" (e.g. "the", "...") is ignored here. The
    official script would count "" == "" as an exact match and, worse, "" is a
    substring of everything; we never let an empty gold match.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np



class Passage(Protocol):
    """What the answer test reads of a passage (rag_lab.data.records.Passage is one): metrics
    imports nothing of rag_lab, so data may use it without a cycle."""
    id: str
    title: str
    text: str

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
# Resampling is done in blocks of at most this many drawn indices (~32 MB of int64),
# so that n_boot=10_000 over 3,610 questions does not allocate a 290 MB index matrix.
_MAX_DRAWS_PER_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- answers

def passage_text(p: Passage) -> str:
    """How every component reads a passage: the title is part of it, as in DPR ("title. text").
    Retrievers encode it, prompts quote it and `AnswerInPassage` searches it: one definition
    (re-exported by rag_lab.data.records, where the data contract lives)."""
    return f"{p.title}. {p.text}" if p.title else p.text


def normalize_answer(s: str) -> str:
    """Official SQuAD / NQ-open normalisation: lower, remove punctuation, remove
    articles, squeeze white space (same order as the official script)."""
    s = s.lower()
    s = s.translate(_PUNCT_TABLE)  # == "".join(ch for ch in s if ch not in set(punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_tokens(answers: Sequence[str]) -> list[list[str]]:
    """Normalised token lists of the golds, dropping those that normalise to nothing."""
    if isinstance(answers, str):  # a bare string would be iterated character by character
        raise TypeError("answers must be a sequence of strings, not a single string")
    golds = (normalize_answer(a).split() for a in answers)
    return [g for g in golds if g]


def _contains_span(haystack_tokens: Sequence[str], needle_tokens: Sequence[str]) -> bool:
    """True if `needle_tokens` occurs as a contiguous run of `haystack_tokens`.

    Normalised tokens never contain spaces, so joining with single spaces and padding
    both ends makes the token-span test a single C-level substring search
    (" 1972 " in " born in 1972 in paris ") rather than a Python loop over offsets;
    the padding is what stops "1972" from matching inside "19721". An empty needle
    never matches.
    """
    if not needle_tokens:
        return False
    return f" {' '.join(needle_tokens)} " in f" {' '.join(haystack_tokens)} "


def _token_f1(pred: Counter, n_pred: int, gold: list[str]) -> float:
    """Official SQuAD token F1 between a prediction's token counts and one gold."""
    # == sum((pred & Counter(gold)).values()), without building the intersection Counter.
    n_same = sum(min(n, pred.get(tok, 0)) for tok, n in Counter(gold).items())
    if n_same == 0:
        return 0.0
    precision, recall = n_same / n_pred, n_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _score_tokens(pred: list[str], golds: list[list[str]]) -> tuple[float, float, float]:
    """(EM, F1, match) of one normalised prediction against non-empty normalised golds,
    each the max over golds. The single implementation behind all public scorers."""
    if not pred or not golds:
        return 0.0, 0.0, 0.0
    em = float(any(pred == g for g in golds))
    counts = Counter(pred)
    f1 = max(_token_f1(counts, len(pred), g) for g in golds)
    match = float(any(_contains_span(pred, g) for g in golds))
    return em, f1, match


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some non-empty normalised gold."""
    return _score_tokens(normalize_answer(prediction).split(), _gold_tokens(answers))[0]


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 (SQuAD), max over golds; empty golds and empty predictions score 0."""
    return _score_tokens(normalize_answer(prediction).split(), _gold_tokens(answers))[1]


def answer_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some non-empty normalised gold is a contiguous token span of the normalised
    prediction (FlashRAG `acc`, BERGEN `Match`). Token-level: "1" does not match "1972"."""
    return _score_tokens(normalize_answer(prediction).split(), _gold_tokens(answers))[2]


def has_answer(answers: Sequence[str], text: str) -> bool:
    """DPR-style retrieval hit: some non-empty normalised gold occurs as a contiguous
    token span of the normalised passage text.

    DPR itself tokenises with its regex SimpleTokenizer after NFD; we use the SQuAD
    normalisation so retrieval hits and reader answer_match agree with each other.
    """
    return has_answer_normalized(gold_spans(answers), padded_normalized(text))


def gold_spans(answers: Sequence[str]) -> list[str]:
    """The golds as padded normalised strings (" december 1972 "), empty ones dropped:
    compute once per question when checking it against many passages."""
    return [f" {' '.join(g)} " for g in _gold_tokens(answers)]


def padded_normalized(text: str) -> str:
    """A passage normalised and padded once, for `has_answer_normalized` (the _contains_span test)."""
    return f" {normalize_answer(text)} "


def has_answer_normalized(golds: Sequence[str], passage: str) -> bool:
    """`has_answer` on pre-normalised inputs from `gold_spans` and `padded_normalized`."""
    return any(g in passage for g in golds)


class AnswerInPassage:
    """The one answer-in-passage test (DPR's "has answer", with the SQuAD normaliser above):
    does a gold answer occur as a contiguous token span of `passage_text(p)`? Each passage is
    normalised once however often it is asked about (a passage recurs across questions).

        holds = AnswerInPassage()
        holds(q.answers, passage)                 # one passage
        holds.any(q.answers, passages)            # the reader's context (answer recall@k)
        holds.matrix(questions, contexts)         # (n_questions, depth) bool, for recall curves
    """

    def __init__(self):
        self._normalized: dict[tuple[str, str, str], str] = {}
        self._golds: dict[tuple[str, ...], list[str]] = {}

    def golds(self, answers: Sequence[str]) -> list[str]:
        key = tuple(answers)
        if key not in self._golds:
            self._golds[key] = gold_spans(answers)
        return self._golds[key]

    def normalized(self, p: Passage) -> str:
        key = (p.id, p.title, p.text)
        if key not in self._normalized:
            self._normalized[key] = padded_normalized(passage_text(p))
        return self._normalized[key]

    def __call__(self, answers: Sequence[str], p: Passage) -> bool:
        return self.in_normalized(answers, self.normalized(p))

    def in_normalized(self, answers: Sequence[str], text: str) -> bool:
        """The test against a passage already normalised by `normalized` (callers that keep the texts)."""
        return has_answer_normalized(self.golds(answers), text)

    def any(self, answers: Sequence[str], passages: Sequence[Passage]) -> bool:
        return any(self(answers, p) for p in passages)

    def matrix(self, questions: Sequence, contexts: Sequence[Sequence[Passage]]) -> np.ndarray:
        """(n_questions, longest context) bool: does the passage at each rank hold a gold answer?"""
        out = np.zeros((len(questions), max((len(c) for c in contexts), default=0)), dtype=bool)
        for i, (q, passages) in enumerate(zip(questions, contexts)):
            for j, p in enumerate(passages):
                out[i, j] = self(q.answers, p)
        return out


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Per-question "em", "f1", "match" arrays (float64, in [0, 1]).

    Each prediction and gold is normalised once and all three scores come from the
    same tokens (the official script re-normalises for every metric and every gold).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    scores = [_score_tokens(normalize_answer(p).split(), _gold_tokens(a)) for p, a in zip(predictions, answers)]
    table = np.array(scores, dtype=np.float64).reshape(len(scores), 3)
    return {"em": table[:, 0], "f1": table[:, 1], "match": table[:, 2]}


def answer_recall_at_k(has_answer_matrix: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-question 0/1 (float64): does any of the first k retrieved passages hold an answer?

    `has_answer_matrix` is (n_questions, n_retrieved) bool, columns in rank order. A k
    beyond the number of columns uses all of them (a short ranking cannot do better).
    """
    hits = np.asarray(has_answer_matrix, dtype=bool)
    if hits.ndim != 2:
        raise ValueError(f"has_answer_matrix must be 2-D (questions x ranks), got shape {hits.shape}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    # hit_by_rank[:, j] answers "any hit in ranks 0..j"; one pass serves every k.
    hit_by_rank = np.logical_or.accumulate(hits, axis=1) if hits.shape[1] else hits
    n_q, width = hits.shape
    out = {}
    for k in ks:
        col = min(k, width) - 1
        out[k] = hit_by_rank[:, col].astype(np.float64) if col >= 0 else np.zeros(n_q)
    return out


# ----------------------------------------------------------------------------- statistics

def _as_1d(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    """Validate and convert to a non-empty 1-D float64 array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `values`, shape (n_boot,).

    Resample r uses indices rng.integers(0, n, size=n), drawn in row order; rows are
    drawn in blocks to bound memory. Block boundaries don't change the draws: numpy's
    Generator consumes its stream element by element, so blocks == one big draw.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = values.size
    rows_per_block = max(1, _MAX_DRAWS_PER_BLOCK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows_per_block):
        stop = min(start + rows_per_block, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile-bootstrap (1 - alpha) CI of the mean; deterministic in seed."""
    arr = _as_1d(values)
    means = _bootstrap_means(arr, n_boot, np.random.default_rng(seed))
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(arr.mean()), float(low), float(high)


def paired_bootstrap_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                          n_boot: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Two-sided paired bootstrap test of mean(a) == mean(b) over the same questions.

    Resamples questions (keeping a/b pairs together) and uses the "shift to null"
    p-value: centring the bootstrap diffs on the observed diff d gives the null
    distribution, so p = (#{|d* - d| >= |d|} + 1) / (n_boot + 1). The +1 convention
    counts the observed sample itself, so p is never 0. Also returns the percentile
    (1 - alpha) CI of the difference mean(a) - mean(b).
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired test needs equal lengths, got len(a)={x.size} and len(b)={y.size}")
    d = x - y
    observed = d.mean()
    boot = _bootstrap_means(d, n_boot, np.random.default_rng(seed))
    extreme = int(np.count_nonzero(np.abs(boot - observed) >= abs(observed)))
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float(observed),
            "p_value": (extreme + 1) / (n_boot + 1), "ci_low": float(low), "ci_high": float(high)}


def mcnemar_exact(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Exact two-sided McNemar test on paired 0/1 outcomes.

    b01 = #(a wrong, b right), b10 = #(a right, b wrong). Under H0 the discordant pairs
    split 50/50, so p = min(1, 2 * P[Binom(b01 + b10, 0.5) <= min(b01, b10)]), computed
    with exact integers (math.comb) so it holds for any n; no discordant pairs -> p = 1.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired test needs equal lengths, got len(a)={x.size} and len(b)={y.size}")
    for name, arr in (("a", x), ("b", y)):
        if not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError(f"{name} must hold only 0/1 outcomes (e.g. EM or match), got {np.unique(arr)[:5]}...")
    b01 = int(np.count_nonzero((x == 0) & (y == 1)))
    b10 = int(np.count_nonzero((x == 1) & (y == 0)))
    n = b01 + b10
    if n == 0:
        return {"b01": 0, "b10": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1))
    return {"b01": b01, "b10": b10, "p_value": min(1.0, 2 * tail / 2**n)}  # int / int is exact-rounded


def mcnemar_power(p01: float, p10: float, n: int, alpha: float = 0.05) -> float:
    """Power of the exact two-sided McNemar test at level `alpha` on n paired questions, when a
    question is discordant one way with probability p01 and the other way with p10.

    Exact: the number of discordant pairs D ~ Binomial(n, p01 + p10), and given D the split
    b01 ~ Binomial(D, p01 / (p01 + p10)); power = P(mcnemar p-value <= alpha), summed over both."""
    pd_ = p01 + p10
    if n <= 0 or pd_ <= 0 or not 0 <= p01 <= 1 or not 0 <= p10 <= 1 or pd_ > 1:
        return 0.0
    from scipy.stats import binom  # why: scipy.stats takes ~1 s to import; only power calculations need it

    power, share = 0.0, p01 / pd_
    d_weights = binom.pmf(np.arange(n + 1), n, pd_)
    for d in np.flatnonzero(d_weights >= 1e-12):  # the discordant counts that carry any probability
        if d == 0:
            continue
        tails = np.minimum(1.0, 2 * binom.cdf(np.minimum(np.arange(d + 1), d - np.arange(d + 1)), d, 0.5))
        power += d_weights[d] * binom.pmf(np.arange(d + 1), d, share)[tails <= alpha].sum()
    return float(power)


def n_for_power(p01: float, p10: float, power: float = 0.8, alpha: float = 0.05, n_max: int = 100_000) -> int | None:
    """The smallest n (searched on a doubling grid, then bisected) at which `mcnemar_power` reaches
    `power`; None if even n_max does not (no effect: p01 == p10)."""
    if p01 == p10:
        return None
    low, high = 1, 16
    while mcnemar_power(p01, p10, high, alpha) < power:
        if high >= n_max:
            return None
        low, high = high, min(high * 2, n_max)
    while high - low > max(1, low // 50):  # 2% resolution is plenty for planning
        mid = (low + high) // 2
        low, high = (mid, high) if mcnemar_power(p01, p10, mid, alpha) < power else (low, mid)
    return high


def summarize(values: Sequence[float] | np.ndarray, seed: int = 0) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high", "n"} with a 95% bootstrap CI (1000 resamples)."""
    mean, low, high = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": len(values)}


def format_ci(mean: float, low: float, high: float, digits: int = 3) -> str:
    """Mean and CI as one string, e.g. "0.123 [0.100, 0.150]"."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# ----------------------------------------------------------------------------- evaluate

def evaluate_module_path() -> str:
    """Absolute path of the Hugging Face `evaluate` module script wrapping these scorers,
    for `evaluate.load(evaluate_module_path())` (works offline: it is a local file)."""
    return str(Path(__file__).resolve().parent / "metrics_module" / "nq_em_f1.py")
