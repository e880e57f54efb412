"""Analysis on hand-built predictions: paired tests, error attribution, disagreements, refusal to mix eval sets."""
import pandas as pd
import pytest

from rag_lab import analysis, plots
from rag_lab.metrics import mcnemar_exact


def preds(ids, match, in_passages=None):
    return [{"id": i, "question": f"q {i}", "answers": ["a"], "prediction": "p", "em": m, "f1": m, "match": m,
             "answer_in_passages": None if in_passages is None else f} for i, m, f in zip(ids, match, in_passages or match)]


IDS = [f"q{i}" for i in range(6)]


def test_error_attribution_counts_each_case():
    rag = preds(IDS, [1, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1])
    closed = preds(IDS, [0, 1, 1, 0, 0, 0])
    out = analysis.error_attribution(rag, closed, metric="match")
    assert (out["correct"], out["correct, answer not in passages"], out["reader miss"], out["retrieval miss"]) == (2, 1, 1, 2)
    assert out["n"] == 6 and sum(out[c] for c in analysis.ATTRIBUTION) == 6
    assert (out["right closed-book"], out["right closed-book and with RAG"], out["right closed-book, lost with RAG"],
            out["gained with RAG"]) == (2, 1, 1, 2)


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
         "f1_high": 0.4, "match": 0.3, "match_low": 0.2, "match_high": 0.4, "recall@k": 0.5, "recall@k_low": 0.3, "recall@k_high": 0.7}])
    for fig in (plots.metric_bars(table), plots.recall_vs_em(table)):
        assert len(fig.axes[0].get_children()) > 5
        plots.plt.close(fig)
    att = pd.DataFrame([{"experiment": "rag", "n": 6, "metric": "match", **analysis.error_attribution(preds(IDS, [1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]))}])
    fig = plots.attribution_bars(att)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])
    plots.plt.close(fig)
