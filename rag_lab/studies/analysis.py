"""Reading results: example predictions, k sweeps, paired comparisons, error attribution.

Everything here works on the files the runner wrote (predictions.jsonl rows, table rows),
so notebooks only call these functions and plot.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np
import pandas as pd

from rag_lab.io import atomic_write_text, read_jsonl
from rag_lab.metrics import mcnemar_exact, mcnemar_power, n_for_power, paired_bootstrap_test
from rag_lab.paths import profile_results_dir
from rag_lab.reporting.results import load_table, to_markdown
from rag_lab.runner import run_experiment


def pick_examples(predictions: Sequence[dict], n: int = 5, correct: bool = True, seed: int = 0) -> pd.DataFrame:
    """n predictions that are right (answer match) or wrong, seeded, as a small table."""
    pool = [r for r in predictions if bool(r["match"]) == correct]
    chosen = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    cols = ["id", "question", "answers", "prediction", "raw", "em", "f1", "match", "answer_in_passages"]
    return pd.DataFrame([{c: pool[i].get(c) for c in cols} for i in chosen], columns=cols)


def k_sweep(cfg, ks: Sequence[int], profile: str = "default", show_progress: bool = True) -> pd.DataFrame:
    """Run `cfg` once per k (experiment names `<name>_k<k>`); one row per k with EM/F1/match/recall and CIs."""
    rows = []
    for k in ks:
        run_cfg = dataclasses.replace(cfg, name=f"{cfg.name}_k{k}", retriever=dataclasses.replace(cfg.retriever, k=k))
        rows.append(run_experiment(run_cfg, profile=profile, show_progress=show_progress).row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- reading the runner's files

def load_predictions(run: str, profile: str = "default") -> list[dict]:
    """The predictions.jsonl of a table row's run folder (the `run` column)."""
    return [row for _, row in read_jsonl(profile_results_dir(profile) / run / "predictions.jsonl")]


def load_results(profile: str = "default", eval_set: str | None = None) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """The main table (rows of one eval set: the largest one unless named) and each row's predictions."""
    table = load_table(profile_results_dir(profile) / "main_table.csv")
    if eval_set is None:
        eval_set = table.groupby("eval_set")["experiment"].count().idxmax()
    table = table[table["eval_set"] == eval_set].reset_index(drop=True)
    return table, {row.experiment: load_predictions(row.run, profile) for row in table.itertuples()}


def _aligned(a: Sequence[dict], b: Sequence[dict], metric: str):
    """Per-question arrays of two systems; refuses rows that are not the same questions in the same order."""
    ids_a, ids_b = [r["id"] for r in a], [r["id"] for r in b]
    if ids_a != ids_b:
        raise ValueError(f"cannot pair systems evaluated on different questions ({len(ids_a)} vs {len(ids_b)} ids, "
                         f"{len(set(ids_a) ^ set(ids_b))} not shared): compare rows of the same eval set only")
    return np.array([float(r[metric]) for r in a]), np.array([float(r[metric]) for r in b])


def paired_tests(predictions: dict[str, list[dict]], pairs: Sequence[tuple[str, str]], metrics=("em", "match", "f1"),
                 seed: int = 0) -> pd.DataFrame:
    """For each (baseline, system) pair and metric: the mean difference with its paired-bootstrap 95% CI and
    p-value, and (for 0/1 metrics) the exact McNemar p-value."""
    rows = []
    for base, system in pairs:
        if base not in predictions or system not in predictions:
            continue
        for m in metrics:
            a, b = _aligned(predictions[base], predictions[system], m)
            test = paired_bootstrap_test(b, a, seed=seed)
            row = {"baseline": base, "system": system, "metric": m, "n": len(a), "baseline_mean": a.mean(),
                   "system_mean": b.mean(), "diff": test["diff"], "diff_low": test["ci_low"], "diff_high": test["ci_high"],
                   "p_bootstrap": test["p_value"]}
            row["p_mcnemar"] = mcnemar_exact(b, a)["p_value"] if m != "f1" else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


ATTRIBUTION = ("correct", "parametric", "reader miss", "packed out", "retrieval miss")


def attribute(row: dict, metric: str = "match") -> str:
    """Where one RAG answer stands, by what the reader saw (the passages packed into its prompt):
    - correct: right, and a passage in the prompt holds the answer;
    - parametric: right, though no passage in the prompt holds it (memory, or luck);
    - reader miss: a passage in the prompt holds the answer, the reader got it wrong;
    - packed out: wrong; the retriever found the answer in its top k, but the context budget cut it;
    - retrieval miss: wrong; no retrieved passage holds it."""
    right, seen = bool(row[metric]), bool(row["answer_in_passages"])
    retrieved = bool(row.get("answer_in_retrieved", seen))  # rows from before the split: what they recorded
    if right:
        return "correct" if seen else "parametric"
    return "reader miss" if seen else "packed out" if retrieved else "retrieval miss"


def error_attribution(rag_predictions: Sequence[dict], closed_book: Sequence[dict] | None = None,
                      metric: str = "match") -> dict:
    """Counts of `attribute` over a RAG system's answers (`ATTRIBUTION`). With `closed_book` (same
    questions), also how many were already right without retrieval."""
    counts = dict.fromkeys(ATTRIBUTION, 0)
    for r in rag_predictions:
        counts[attribute(r, metric)] += 1
    out = {"n": len(rag_predictions), "metric": metric, **counts}
    if closed_book is not None:
        cb, rag = _aligned(closed_book, rag_predictions, metric)
        out["right closed-book"] = int(cb.sum())
        out["right closed-book and with RAG"] = int((cb * rag).sum())
        out["right closed-book, lost with RAG"] = int((cb * (1 - rag)).sum())
        out["gained with RAG"] = int(((1 - cb) * rag).sum())
    return out


def attribution_table(table: pd.DataFrame, predictions: dict[str, list[dict]], closed_book: str | dict[str, str] | None = None,
                      metric: str = "match") -> pd.DataFrame:
    """error_attribution for every row that used retrieval; `closed_book` names the closed-book row
    to compare with, one for all or one per generator ({generator: experiment})."""
    rows = []
    for row in table.itertuples():
        preds = predictions[row.experiment]
        base = closed_book.get(row.generator) if isinstance(closed_book, dict) else closed_book
        cb = predictions.get(base) if base else None
        if preds and preds[0]["answer_in_passages"] is not None:
            rows.append({"experiment": row.experiment, "regime": row.regime, "closed-book row": base if cb else "",
                         **error_attribution(preds, cb, metric)})
    return pd.DataFrame(rows)


def disagreements(a: Sequence[dict], b: Sequence[dict], metric: str = "match", names=("A", "B")) -> pd.DataFrame:
    """Questions where exactly one of two systems is right (same questions required)."""
    x, y = _aligned(a, b, metric)
    rows = []
    for ra, rb, va, vb in zip(a, b, x, y):
        if va != vb:
            rows.append({"id": ra["id"], "question": ra["question"], "answers": ra["answers"],
                         f"{names[0]} prediction": ra["prediction"], f"{names[1]} prediction": rb["prediction"],
                         "right": names[0] if va > vb else names[1],
                         "answer_in_passages": rb.get("answer_in_passages")})
    return pd.DataFrame(rows)


HEADLINE = ("qwen_closed_book", "qwen_rag")  # RAG against closed-book, with the strongest packaged reader


def adjacent_pairs(experiments: Sequence[str]) -> list[tuple[str, str]]:
    """The comparisons the table is about, among the experiments present: block 1 (one backbone,
    four regimes), block 2 (the strongest reader), and the same RAG setting across backbones."""
    wanted = [("closed_book_zero_shot", "finetune_closed_book"), ("closed_book_zero_shot", "rag_zero_shot"),
              ("rag_zero_shot", "finetune_rag"), ("finetune_closed_book", "finetune_rag"),
              ("finetune_rag", "reader_extractive"), HEADLINE, ("rag_zero_shot", "qwen_rag"),
              ("closed_book_zero_shot", "qwen_closed_book"),
              # extended profile: the other retrievers, the coverage pair, the larger reader
              ("closed_book_zero_shot", "rag_zero_shot_bm25"), ("closed_book_zero_shot", "rag_zero_shot_dense"),
              ("closed_book_zero_shot", "rag_zero_shot_hybrid"), ("qwen_rag", "qwen_rag_dense"), ("qwen_rag", "qwen_rag_hybrid"),
              ("qwen_rag_vital", "qwen_rag"), ("qwen_closed_book", "qwen15_closed_book"), ("qwen_rag", "qwen15_rag")]
    present = set(experiments)
    return [(a, b) for a, b in wanted if a in present and b in present]


def headline_test(predictions: dict[str, list[dict]], pair: tuple[str, str] = HEADLINE, metric: str = "em",
                  alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """The headline pair on every question and on the answer-in-corpus lens: means, the paired
    difference with its bootstrap CI, the exact McNemar p, and the test's power at this n for the
    discordance observed (with the n that 80% power would need). Power from observed rates is a
    post-hoc planning figure: it says how often a study of this size would separate an effect
    of this size, not whether this one is real."""
    base, system = pair
    rows = []
    for lens, keep in (("all questions", lambda r: True), ("answer in corpus", lambda r: bool(r.get("answer_in_corpus")))):
        a_rows = [r for r in predictions[base] if keep(r)]
        b_rows = [r for r in predictions[system] if keep(r)]
        a, b = _aligned(a_rows, b_rows, metric)
        n, test, mc = len(a), paired_bootstrap_test(b, a, seed=seed), mcnemar_exact(b, a)
        # mcnemar_exact(b, a): b01 = system wrong & baseline right, b10 = system right & baseline wrong
        p01, p10 = mc["b01"] / n, mc["b10"] / n
        rows.append({"lens": lens, "baseline": base, "system": system, "metric": metric, "n": n,
                     "baseline_mean": a.mean(), "system_mean": b.mean(), "diff": test["diff"],
                     "diff_low": test["ci_low"], "diff_high": test["ci_high"], "system only right": mc["b10"],
                     "baseline only right": mc["b01"], "p_mcnemar": mc["p_value"], "p_bootstrap": test["p_value"],
                     "power at n": mcnemar_power(p01, p10, n, alpha), "n for 80% power": n_for_power(p01, p10, 0.8, alpha)})
    return pd.DataFrame(rows)


def oracle_comparison(predictions: dict[str, list[dict]], oracle: str, systems: Sequence[str], metric: str = "em") -> pd.DataFrame:
    """The oracle row against other rows on the oracle's questions (those with an answer in the corpus):
    retrieval's share of the gap is system -> oracle, the reader's is oracle -> 1."""
    ids = {r["id"] for r in predictions[oracle]}
    rows = [{"experiment": oracle, "n": len(ids), metric: sum(float(r[metric]) for r in predictions[oracle]) / len(ids)}]
    for name in systems:
        if name in predictions:
            kept = [r for r in predictions[name] if r["id"] in ids]
            rows.append({"experiment": name, "n": len(kept), metric: sum(float(r[metric]) for r in kept) / max(len(kept), 1)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the README's "What the table says"

def _verdict(p: float, alpha: float = 0.05) -> str:
    return "separates" if p < alpha else "does not separate"


def findings(tests: pd.DataFrame, headline: pd.DataFrame | None, oracle: pd.DataFrame | None = None,
             metric: str = "em", alpha: float = 0.05) -> list[str]:
    """Sentences generated from the paired tests (never typed by hand): what separates at `alpha`
    and what does not, whatever the numbers are."""
    out = []
    if headline is not None and len(headline):
        for _, r in headline[headline["metric"] == metric].iterrows():
            need = r["n for 80% power"]
            out.append(f"**Headline ({r['lens']}, n = {r['n']})**: {r['system']} {metric.upper()} {r['system_mean']:.3f} vs "
                       f"{r['baseline']} {r['baseline_mean']:.3f}, difference {r['diff']:+.3f} [{r['diff_low']:+.3f}, "
                       f"{r['diff_high']:+.3f}]; {r['system only right']} questions right only with RAG, "
                       f"{r['baseline only right']} only closed-book; exact McNemar p = {r['p_mcnemar']:.2g}: the test "
                       f"{_verdict(r['p_mcnemar'], alpha)} the two at α = {alpha}. Its power at this n for the discordance "
                       f"observed is {r['power at n']:.2f}" + (f" (80% would need n ≈ {int(need)})" if pd.notna(need) else "") + ".")
    for r in tests[tests["metric"] == metric].itertuples():
        against = ""
        if (r.baseline, r.system) in EXPECTED_GAINS and r.diff < 0:
            against = (" **Against the expected order**: the second row is below the first"
                       + ("." if r.p_mcnemar < alpha else ", though not significantly."))
        out.append(f"{r.baseline} → {r.system}: {metric.upper()} {r.baseline_mean:.3f} → {r.system_mean:.3f} "
                   f"({r.diff:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}], McNemar p = {r.p_mcnemar:.2g}): "
                   f"{_verdict(r.p_mcnemar, alpha)} at α = {alpha} (n = {r.n}).{against}")
    if oracle is not None and len(oracle):
        for r in oracle.itertuples():
            given = ("the NQ-annotated gold passage", "questions that have one") if getattr(r, "lens", "gold") == "gold" else (
                "one passage holding a gold answer string (the looser, answer-string lens)", "questions whose answer occurs in the corpus")
            out.append(f"Oracle passage, {r.reader}: given {given[0]}, {metric.upper()} "
                       f"{r.oracle:.3f} on the {r.n} {given[1]}, against {r.rag:.3f} with retrieval and "
                       f"{r.closed_book:.3f} closed-book on the same questions: better retrieval could add up to "
                       f"{r.oracle - r.rag:+.3f}; the reader still misses {1 - r.oracle:.3f} with the answer in front of it.")
    return out


# Pairs whose second row the comparison expects to be better (a fine-tuned over a zero-shot reader, retrieval over
# none, a corpus that holds the answers over one that does not): a drop is named in the findings, not left to the reader.
EXPECTED_GAINS = {("closed_book_zero_shot", "finetune_closed_book"), ("closed_book_zero_shot", "rag_zero_shot"),
                  ("rag_zero_shot", "finetune_rag"), ("finetune_closed_book", "finetune_rag"), HEADLINE,
                  ("rag_zero_shot", "qwen_rag"), ("closed_book_zero_shot", "qwen_closed_book"), ("qwen_rag_vital", "qwen_rag"),
                  ("closed_book_zero_shot", "rag_zero_shot_bm25"), ("closed_book_zero_shot", "rag_zero_shot_dense"),
                  ("closed_book_zero_shot", "rag_zero_shot_hybrid")}


def oracle_summary(table: pd.DataFrame, predictions: dict[str, list[dict]], oracle_rows: pd.DataFrame,
                   rag: dict[str, str], closed_book: dict[str, str], profile: str = "default", metric: str = "em") -> pd.DataFrame:
    """Per reader: its oracle row against its RAG and closed-book rows on the oracle's questions."""
    rows = []
    for row in oracle_rows.itertuples():
        preds = {row.experiment: load_predictions(row.run, profile), **predictions}
        names = [n for n in (rag.get(row.generator), closed_book.get(row.generator)) if n in preds]
        if len(names) < 2:
            continue
        comp = oracle_comparison(preds, row.experiment, names, metric).set_index("experiment")[metric]
        rows.append({"reader": row.generator, "experiment": row.experiment, "lens": row.retriever, "n": int(row.n), "oracle": comp[row.experiment],
                     "rag": comp[names[0]], "closed_book": comp[names[1]]})
    return pd.DataFrame(rows)


def write_findings(lines: list[str], headline: pd.DataFrame | None, profile: str = "default") -> None:
    """results/findings.md (the README's "What the table says") and results/headline.{csv,md}."""
    folder = profile_results_dir(profile)
    atomic_write_text(folder / "findings.md", "# What the table says\n\nGenerated by notebook 06 from the paired "
                      "tests (α = 0.05), never typed by hand.\n\n" + "".join(f"- {line}\n" for line in lines))
    if headline is not None:
        atomic_write_text(folder / "headline.csv", headline.to_csv(index=False))
        cols = ["lens", "metric", "n", "baseline_mean", "system_mean", "diff", "diff_low", "diff_high",
                "system only right", "baseline only right", "p_mcnemar", "p_bootstrap", "power at n", "n for 80% power"]
        shown = headline[cols].round(4).astype(object)
        for col in ("p_mcnemar", "p_bootstrap"):  # p-values keep their magnitude: 2.1e-27, not 0
            shown[col] = [f"{v:.2g}" if pd.notna(v) else "" for v in headline[col]]
        shown["n for 80% power"] = [int(v) if pd.notna(v) else "not reached" for v in headline["n for 80% power"]]
        atomic_write_text(folder / "headline.md", "# The headline pair: qwen_rag vs qwen_closed_book\n\n"
                          + to_markdown(shown) + "\n")
