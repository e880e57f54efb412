"""Tests for rag_lab.metrics and its `evaluate` module; every expected value is hand-computed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rag_lab.metrics as M
from rag_lab.metrics import (
    answer_match,
    answer_recall_at_k,
    bootstrap_ci,
    evaluate_module_path,
    exact_match,
    f1_score,
    format_ci,
    has_answer,
    mcnemar_exact,
    normalize_answer,
    paired_bootstrap_test,
    score_predictions,
    summarize,
)


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Beatles", "beatles"),
        ("  Hello,   World!! ", "hello world"),
        ("an apple a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("rock'n'roll", "rocknroll"),
        ("tab\tand\nnewline", "tab and newline"),
        ("Café", "café"),  # no accent folding (official behaviour)
        ("1939–1945", "1939–1945"),  # en dash is not in string.punctuation: kept
        ("...", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_unicode_answers_match_themselves_only():
    assert exact_match("Beyoncé", ["Beyoncé"]) == 1.0
    assert exact_match("beyoncé!", ["Beyoncé"]) == 1.0
    assert exact_match("Beyonce", ["Beyoncé"]) == 0.0


# ----------------------------------------------------------------------------- EM / F1 / match

def test_exact_match_articles_case_punctuation():
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("the beatles.", ["The Beatles"]) == 1.0
    assert exact_match("The Rolling Stones", ["beatles"]) == 0.0


def test_max_over_several_golds():
    assert exact_match("December 1972", ["14 December 1972 UTC", "December 1972"]) == 1.0
    # "cat sat" vs "cat sat on mat": precision 1, recall 1/2 -> 2/3; vs "cat sat" -> 1.
    assert f1_score("cat sat", ["dog", "cat sat on mat"]) == pytest.approx(2 / 3)
    assert f1_score("cat sat", ["dog", "cat sat on mat", "cat sat"]) == 1.0
    assert answer_match("it was 1972", ["1971", "1972"]) == 1.0


def test_empty_gold_never_matches():
    # "the" and "..." normalise to "", which the naive script would count as matching.
    for gold in ("the", "...", ""):
        assert exact_match("anything", [gold]) == 0.0
        assert exact_match("the", [gold]) == 0.0  # pred also normalises to ""
        assert f1_score("anything", [gold]) == 0.0
        assert answer_match("anything at all", [gold]) == 0.0
        assert has_answer([gold], "any passage text whatsoever") is False
    # A valid gold next to an empty one still works.
    assert exact_match("Paris", ["the", "Paris"]) == 1.0
    assert f1_score("Paris", ["...", "Paris"]) == 1.0
    assert answer_match("in Paris", ["the", "Paris"]) == 1.0
    assert has_answer(["the", "Paris"], "He lived in Paris.") is True


def test_f1_hand_example():
    # Articles removed: pred tokens [cat, sat, on, mat]; 2 in common with [cat, sat].
    # precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert f1_score("the cat sat on mat", ["cat sat"]) == pytest.approx(0.6666666667)
    # Repeated tokens count once per occurrence in the gold: common 1, precision 1/2.
    assert f1_score("paris paris", ["Paris"]) == pytest.approx(2 / 3)
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("London", ["Paris"]) == 0.0


def test_answer_match_respects_token_boundaries():
    assert answer_match("in 1972", ["1972"]) == 1.0
    assert answer_match("19721", ["1972"]) == 0.0
    assert answer_match("born in 1972 in Paris", ["1972"]) == 1.0
    assert answer_match("1", ["1972"]) == 0.0 and answer_match("1972", ["1"]) == 0.0
    assert answer_match("She moved to New York City.", ["new york"]) == 1.0
    assert answer_match("york new", ["New York"]) == 0.0  # order matters


def test_answers_must_be_a_list():
    with pytest.raises(TypeError):
        exact_match("paris", "paris")


def test_has_answer_dpr_semantics():
    passage = "The Eiffel Tower (French: tour Eiffel) is a wrought-iron lattice tower in Paris, completed in 1889."
    assert has_answer(["Eiffel Tower"], passage) is True
    assert has_answer(["1889"], passage) is True
    assert has_answer(["188"], passage) is False  # not a token of the passage
    assert has_answer(["London", "PARIS"], passage) is True
    assert has_answer(["tower Eiffel is"], passage) is False
    assert has_answer(["wroughtiron"], passage) is True  # the hyphen is removed, like in the gold
    assert has_answer(["U.S."], "The US Army") is True
    assert has_answer(["Paris"], "") is False


def test_score_predictions_agrees_with_scalar_scorers():
    preds = ["the cat sat on mat", "Paris", "in 1972", "", "Beyoncé"]
    golds = [["cat sat"], ["the", "paris"], ["1972", "December 1972"], ["x"], ["Beyonce"]]
    s = score_predictions(preds, golds)
    assert set(s) == {"em", "f1", "match"}
    np.testing.assert_array_equal(s["em"], [0, 1, 0, 0, 0])
    np.testing.assert_allclose(s["f1"], [2 / 3, 1, 2 / 3, 0, 0])
    np.testing.assert_array_equal(s["match"], [1, 1, 1, 0, 0])
    for p, g, em, f1, m in zip(preds, golds, s["em"], s["f1"], s["match"]):
        assert (exact_match(p, g), f1_score(p, g), answer_match(p, g)) == (em, f1, m)
    assert score_predictions([], [])["em"].shape == (0,)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_predictions(["a", "b"], [["a"]])


# ----------------------------------------------------------------------------- recall@k

def test_answer_recall_at_k():
    hits = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=bool)
    r = answer_recall_at_k(hits, [1, 2, 3, 10])
    np.testing.assert_array_equal(r[1], [0, 1, 0, 0])
    np.testing.assert_array_equal(r[2], [0, 1, 0, 1])
    np.testing.assert_array_equal(r[3], [1, 1, 0, 1])
    np.testing.assert_array_equal(r[10], r[3])  # k beyond the width uses every column
    assert r[1].dtype == np.float64
    np.testing.assert_array_equal(answer_recall_at_k(np.zeros((2, 0), bool), [5])[5], [0, 0])
    with pytest.raises(ValueError):
        answer_recall_at_k(hits, [0])
    with pytest.raises(ValueError):
        answer_recall_at_k(np.zeros(3, bool), [1])


# ----------------------------------------------------------------------------- bootstrap

def _slow_bootstrap_ci(values, n_boot, alpha, seed):
    """Reference: one resample at a time, pure-Python means, same RNG stream."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in idx) / len(values))
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return sum(values) / len(values), low, high


def test_bootstrap_ci_matches_slow_reference():
    values = [float(v) for v in np.random.default_rng(123).random(37) > 0.4]
    fast = bootstrap_ci(values, n_boot=500, alpha=0.1, seed=7)
    assert fast == pytest.approx(_slow_bootstrap_ci(values, 500, 0.1, 7), abs=1e-12)


def test_bootstrap_ci_blocking_does_not_change_draws(monkeypatch):
    values = np.random.default_rng(5).random(101)
    whole = bootstrap_ci(values, n_boot=300, seed=3)
    monkeypatch.setattr(M, "_MAX_DRAWS_PER_BLOCK", 250)  # 2 resamples per block
    assert bootstrap_ci(values, n_boot=300, seed=3) == whole


def test_bootstrap_ci_basic_properties():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    mean, low, high = bootstrap_ci(values, seed=0)
    assert mean == pytest.approx(0.7)
    assert low <= mean <= high and 0 <= low and high <= 1 and low < high
    assert bootstrap_ci(values, seed=0) == (mean, low, high)  # deterministic
    floats = np.random.default_rng(9).random(200)  # continuous values: CIs differ by seed
    assert bootstrap_ci(floats, seed=1) != bootstrap_ci(floats, seed=2)
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summarize_and_format_ci():
    s = summarize([1, 0, 1, 1])
    assert s["n"] == 4 and s["mean"] == 0.75 and s["ci_low"] <= 0.75 <= s["ci_high"]
    assert (s["mean"], s["ci_low"], s["ci_high"]) == bootstrap_ci([1, 0, 1, 1])
    assert format_ci(0.1234, 0.1, 0.15) == "0.123 [0.100, 0.150]"
    assert format_ci(0.5, 0.25, 0.75, digits=1) == "0.5 [0.2, 0.8]"  # round-half-even on 0.25


# ----------------------------------------------------------------------------- paired tests

def test_paired_bootstrap_identical_systems():
    a = np.random.default_rng(0).random(40) > 0.5
    r = paired_bootstrap_test(a, a, n_boot=2000)
    assert r["diff"] == 0.0 and r["p_value"] == 1.0
    assert r["ci_low"] == r["ci_high"] == 0.0
    assert r["mean_a"] == r["mean_b"] == a.mean()


def test_paired_bootstrap_very_different_systems():
    r = paired_bootstrap_test(np.ones(50), np.zeros(50), n_boot=2000)
    assert r["diff"] == 1.0 and r["mean_a"] == 1.0 and r["mean_b"] == 0.0
    assert r["p_value"] == pytest.approx(1 / 2001) and r["p_value"] < 0.01
    assert r["ci_low"] == r["ci_high"] == 1.0


def test_paired_bootstrap_small_difference_is_not_significant():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0] * 3, float)
    b = a.copy()
    b[0] = 0  # one question flipped out of 30
    r = paired_bootstrap_test(a, b, n_boot=2000, seed=1)
    assert r["diff"] == pytest.approx(1 / 30) and r["p_value"] > 0.2
    assert r["ci_low"] <= r["diff"] <= r["ci_high"]


def test_paired_tests_reject_length_mismatch():
    with pytest.raises(ValueError, match=r"len\(a\)=3.*len\(b\)=2"):
        paired_bootstrap_test([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"len\(a\)=3.*len\(b\)=2"):
        mcnemar_exact([1, 0, 1], [1, 0])


def _pairs(b01: int, b10: int, n_agree: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 outcomes with the given discordant counts plus some agreeing pairs."""
    a = [0] * b01 + [1] * b10 + [1, 0] * (n_agree // 2)
    b = [1] * b01 + [0] * b10 + [1, 0] * (n_agree // 2)
    return np.array(a), np.array(b)


@pytest.mark.parametrize(
    "b01, b10, p",
    [
        (0, 5, 2 * 0.5**5),  # 0.0625
        (1, 9, 2 * (1 + 10) / 1024),  # 0.021484375
        (9, 1, 2 * (1 + 10) / 1024),  # symmetric
        (3, 3, 1.0),  # 2 * P[X <= 3 | n=6] = 2 * 42/64 > 1 -> clipped
        (0, 0, 1.0),  # no discordant pairs
    ],
)
def test_mcnemar_exact_hand_values(b01, b10, p):
    r = mcnemar_exact(*_pairs(b01, b10))
    assert (r["b01"], r["b10"]) == (b01, b10)
    assert r["p_value"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0, 0.5, 1], [0, 1, 1])


# ----------------------------------------------------------------------------- evaluate module

_EVALUATE_SCRIPT = """
import json, sys, evaluate
nq = evaluate.load(sys.argv[1], keep_in_memory=True)
args = json.loads(sys.argv[2])
print(json.dumps(nq.compute(predictions=args["predictions"], references=args["references"])))
"""


def test_evaluate_module_matches_score_predictions(tmp_path, monkeypatch):
    path = evaluate_module_path()
    assert Path(path).is_absolute() and Path(path).is_file()
    # evaluate reads these at import time, so run it in a fresh interpreter that inherits
    # them: offline, and every cache (including the copied module script) under tmp_path.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_EVALUATE_CACHE", str(tmp_path / "hf" / "evaluate"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf" / "modules"))
    preds = ["the Eiffel Tower", "Paris, France", "x", "born in 1972", "Beyoncé"]
    refs = [["Eiffel Tower"], ["Paris"], ["the"], ["1972", "December 1972"], ["Beyoncé", "B"]]
    args = json.dumps({"predictions": preds, "references": refs})
    done = subprocess.run([sys.executable, "-c", _EVALUATE_SCRIPT, path, args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    s = score_predictions(preds, refs)
    assert got == pytest.approx({"exact_match": s["em"].mean(), "f1": s["f1"].mean(),
                                 "answer_match": s["match"].mean()}, abs=1e-12)
    # Hand values: EM [1,0,0,0,1], F1 [1,2/3,0,1/2,1], match [1,1,0,1,1].
    assert got == pytest.approx({"exact_match": 0.4, "f1": (1 + 2 / 3 + 0 + 1 / 2 + 1) / 5, "answer_match": 0.8})
    assert list((tmp_path / "hf" / "modules").rglob("nq_em_f1.py"))  # the cache really moved
