"""Analysis on hand-built predictions: paired tests, error attribution, disagreements, refusal to mix eval sets."""
import pandas as pd
import pytest

from rag_lab.studies import analysis, plots
from rag_lab.metrics import mcnemar_exact


def preds(ids, match, in_passages=None):
    return [{"id": i, "question": f"q {i}", "answers": ["a"], "prediction": "p", "em": m, "f1": m, "match": m,
             "answer_in_passages": None if in_passages is None else f} for i, m, f in zip(ids, match, in_passages or match)]


IDS = [f"q{i}" for i in range(6)]


def test_error_attribution_counts_each_case():
    rag = preds(IDS, [1, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1])
    closed = preds(IDS, [0, 1, 1, 0, 0, 0])
    out = analysis.error_attribution(rag, closed, metric="match")
    assert (out["correct"], out["parametric"], out["reader miss"], out["packed out"], out["retrieval miss"]) == (2, 1, 1, 0, 2)
    assert out["n"] == 6 and sum(out[c] for c in analysis.ATTRIBUTION) == 6
    assert (out["right closed-book"], out["right closed-book and with RAG"], out["right closed-book, lost with RAG"],
            out["gained with RAG"]) == (2, 1, 1, 2)


def test_attribution_counts_what_the_reader_saw_not_what_was_retrieved():
    """A wrong answer whose answer-bearing passage was retrieved but cut by the context budget is 'packed out',
    not a reader miss (the reader never saw it); a right answer with the answer only in a cut passage is parametric."""
    rows = [{"id": f"q{i}", "match": m, "answer_in_passages": seen, "answer_in_retrieved": got}
            for i, (m, seen, got) in enumerate([(0, False, True), (0, True, True), (0, False, False), (1, False, True), (1, True, True)])]
    assert [analysis.attribute(r) for r in rows] == ["packed out", "reader miss", "retrieval miss", "parametric", "correct"]
    out = analysis.error_attribution(rows)
    assert (out["packed out"], out["reader miss"], out["retrieval miss"], out["parametric"], out["correct"]) == (1, 1, 1, 1, 1)


def test_paired_tests_and_refusal_to_mix_question_sets():
    a = preds(IDS, [0, 0, 0, 0, 1, 0])
    b = preds(IDS, [1, 1, 1, 1, 1, 0])
    table = analysis.paired_tests({"A": a, "B": b}, [("A", "B")], metrics=("em",))
    row = table.iloc[0]
    assert row["diff"] == pytest.approx(4 / 6) and row["baseline_mean"] == pytest.approx(1 / 6)
    assert row["p_mcnemar"] == pytest.approx(mcnemar_exact([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 0])["p_value"]) == pytest.approx(0.125)
    other = preds([f"x{i}" for i in range(6)], [1] * 6)
    with pytest.raises(ValueError, match="different questions"):
        analysis.paired_tests({"A": a, "C": other}, [("A", "C")])
    with pytest.raises(ValueError, match="different questions"):
        analysis.error_attribution(preds(IDS, [1] * 6, [1] * 6), other)


def test_disagreements_lists_only_split_decisions():
    a, b = preds(IDS, [1, 0, 1, 0, 1, 1]), preds(IDS, [1, 1, 0, 0, 1, 0])
    d = analysis.disagreements(a, b, names=("cb", "rag"))
    assert list(d["id"]) == ["q1", "q2", "q5"] and list(d["right"]) == ["rag", "cb", "cb"]


def test_adjacent_pairs_keeps_present_experiments():
    assert analysis.adjacent_pairs(["closed_book_zero_shot", "rag_zero_shot", "finetune_rag", "qwen_rag"]) == [
        ("closed_book_zero_shot", "rag_zero_shot"), ("rag_zero_shot", "finetune_rag"), ("rag_zero_shot", "qwen_rag")]


def test_figures_render():
    table = pd.DataFrame([
        {"experiment": "cb", "regime": "closed_book", "n": 6, "em": 0.1, "em_low": 0.0, "em_high": 0.2, "f1": 0.2, "f1_low": 0.1,
         "f1_high": 0.3, "match": 0.2, "match_low": 0.1, "match_high": 0.3, "recall@k": float("nan"), "recall@k_low": float("nan"), "recall@k_high": float("nan")},
        {"experiment": "rag", "regime": "rag", "n": 6, "em": 0.2, "em_low": 0.1, "em_high": 0.3, "f1": 0.3, "f1_low": 0.2,
         "f1_high": 0.4, "match": 0.3, "match_low": 0.2, "match_high": 0.4, "recall@k": 0.5, "recall@k_low": 0.3, "recall@k_high": 0.7,
         "in_prompt": 0.4, "in_prompt_low": 0.2, "in_prompt_high": 0.6}])
    for fig in (plots.metric_bars(table), plots.recall_vs_em(table)):
        assert len(fig.axes[0].get_children()) > 5
        plots.plt.close(fig)
    att = pd.DataFrame([{"experiment": "rag", "n": 6, "metric": "match", **analysis.error_attribution(preds(IDS, [1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]))}])
    fig = plots.attribution_bars(att)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0, 3 / 6])  # correct, parametric, reader miss, packed out, retrieval miss
    plots.plt.close(fig)


def test_headline_test_counts_each_side_and_its_lens():
    ids = [f"q{i}" for i in range(10)]
    cb = preds(ids, [1, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    rag = preds(ids, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    for i, r in enumerate(cb + rag):
        r["answer_in_corpus"] = int(r["id"][1:]) < 5  # q0..q4
    table = analysis.headline_test({"qwen_closed_book": cb, "qwen_rag": rag}, metric="em").set_index("lens")
    everything, lens = table.loc["all questions"], table.loc["answer in corpus"]
    assert (everything["n"], everything["system only right"], everything["baseline only right"]) == (10, 3, 1)
    assert everything["diff"] == pytest.approx(0.2) and everything["p_mcnemar"] == pytest.approx(0.625)
    assert (lens["n"], lens["system only right"], lens["baseline only right"]) == (5, 3, 0)
    assert 0 <= everything["power at n"] <= 1
    lines = analysis.findings(pd.DataFrame(columns=["metric"]), table.reset_index(), metric="em")
    assert "3 questions right only with RAG, 1 only closed-book" in lines[0] and "does not separate" in lines[0]


def test_mcnemar_power_exact_small_cases():
    from rag_lab.metrics import mcnemar_power, n_for_power

    # n = 1 can never reject at 0.05 (smallest p is 1); no discordance, no power
    assert mcnemar_power(0.5, 0.0, 1) == 0.0 and mcnemar_power(0.0, 0.0, 100) == 0.0
    # n = 6, every question discordant one way: b10 = 6 gives p = 2/64 < 0.05; power = P(all 6 one way) = 1
    assert mcnemar_power(1.0, 0.0, 6) == pytest.approx(1.0)
    assert mcnemar_power(1.0, 0.0, 5) == 0.0  # 2/32 > 0.05: five cannot reject
    # brute force on n = 8 against an enumeration of all outcomes
    import itertools
    p01, p10, n, total = 0.3, 0.1, 8, 0.0
    for outcome in itertools.product((0, 1, 2), repeat=n):  # 0 concordant, 1 = b01, 2 = b10
        prob = 1.0
        for o in outcome:
            prob *= (1 - p01 - p10, p01, p10)[o]
        a = [1.0 if o == 1 else 0.0 for o in outcome]
        b = [1.0 if o == 2 else 0.0 for o in outcome]
        total += prob * (mcnemar_exact(a, b)["p_value"] <= 0.05)
    assert mcnemar_power(p01, p10, n) == pytest.approx(total, abs=1e-9)
    assert n_for_power(0.02, 0.02) is None
    n = n_for_power(0.02, 0.08)
    assert mcnemar_power(0.02, 0.08, n) >= 0.8


def test_end_to_end_rows_read_without_compute_name_the_missing_rows(tmp_path, monkeypatch):
    """Notebook 07's compute-or-read (studies/end_to_end.rows): reading a profile whose table lacks the rows is an
    error naming the table and the rows, not an empty notebook; an unknown profile fails first."""
    from rag_lab.studies import end_to_end

    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    with pytest.raises(FileNotFoundError, match=r"main_table.csv: no row for finetune_rag_dense, finetune_rag_rag_sequence"):
        end_to_end.rows("smoke", compute=False)
    with pytest.raises(ValueError, match="unknown profile 'nightly'"):
        end_to_end.rows("nightly", compute=False)
    with pytest.raises(ValueError, match="no 'default' profile: it runs in smoke, extended only"):
        end_to_end.rows_profile("default")  # the rows need the whole corpus's dense index: extended (smoke for checks)
    assert end_to_end.rows_profile("extended") == "extended" and end_to_end.rows_profile("smoke") == "smoke"
