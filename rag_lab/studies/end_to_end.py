"""What end-to-end training did to the retriever (notebook 07): answer recall@k of the query encoders
trained through the reader against the one they started from, on the whole eval split, over the
same fixed passage embeddings; paired tests on the same questions; the questions whose top-1 changed.

    study = query_encoder_study(base_cfg, {"rag_sequence": final_dir, ...}, profile)
    study.table        # rows of results/retrieval.* (beside notebook 01's retrievers)
    study.tests        # recall@k differences vs the starting encoder, paired bootstrap + McNemar
    examples, counts = top1_changes(frozen_predictions, e2e_predictions, corpus)   # the top-1 that changed
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rag_lab.config import DataConfig, ExperimentConfig, load_experiment
from rag_lab.data.corpus import Corpus, as_corpus
from rag_lab.data.records import Passage, QAExample
from rag_lab.data import load_qa
from rag_lab.data.subsets import corpus_for, corpus_label, eval_set_name, subset_questions
from rag_lab.metrics import AnswerInPassage, mcnemar_exact, paired_bootstrap_test
from rag_lab.paths import REPO_ROOT, profile_results_dir
from rag_lab.pipeline import Contexts, contexts
from rag_lab.reporting.results import KS, display_retrieval_table, load_table, upsert_rows
from rag_lab.runner import run_experiment
from rag_lab.studies.analysis import load_predictions, paired_tests
from rag_lab.studies.retrieval_eval import (RETRIEVAL_NOTE, RETRIEVAL_TITLE, RetrievalEval, describe, evaluate_contexts, load_study_data,
                                   recall_row)
from rag_lab.training import QUERY_ENCODER

RECALL_TESTS = "end_to_end_recall"  # results/<this>.{csv,md}: the paired tests of the study


@dataclass
class QueryEncoderStudy:
    table: pd.DataFrame  # this study's rows of results/retrieval.csv
    tests: pd.DataFrame  # recall@k of each trained encoder minus the starting one, paired
    evals: dict[str, RetrievalEval]
    contexts: dict[str, Contexts]
    questions: list[QAExample]


def query_encoder_study(cfg: ExperimentConfig, trained: dict[str, Path], profile: str = "default", n_eval: int | None = None,
                        ks=KS, show_progress: bool = True) -> QueryEncoderStudy:
    """Recall@k on `cfg`'s eval split (all of it unless `n_eval`; the training never saw it) of the
    starting query encoder (`cfg.retriever`) and of each trained one (`trained[name]` is a final model
    folder holding `query_encoder/`), the passage side fixed. Rows are upserted into results/retrieval.*
    as `dense` (unchanged: the starting encoder) and `dense_e2e_<name>`; the tests into results/end_to_end_recall.*."""
    data: DataConfig = dataclasses.replace(cfg.data, n_eval=n_eval)
    questions, passages = load_study_data(data)
    eval_set, holds = eval_set_name(data, len(questions)), AnswerInPassage()
    encoders = {"dense": cfg.retriever, **{f"dense_e2e_{name}": dataclasses.replace(cfg.retriever, query_encoder=str(Path(final) / QUERY_ENCODER))
                                           for name, final in trained.items()}}
    evals, ctxs, rows = {}, {}, []
    for name, rcfg in encoders.items():
        (ctx,) = contexts(rcfg, passages, max(ks), questions, show_progress=show_progress, corpus_label=corpus_label(data),
                          profile=profile)
        ctxs[name], evals[name] = ctx, evaluate_contexts(name, eval_set, questions, ctx, holds)
        config = describe(cfg.retriever) + (f"; query encoder trained end to end ({name[len('dense_e2e_'):]}, notebook 07)"
                                             if name != "dense" else "")
        if name != "dense":  # the starting encoder's row is notebook 01's `dense` (the same config, the same numbers)
            rows.append(recall_row(evals[name], config, ks))
    table = upsert_rows(profile_results_dir(profile) / "retrieval.csv", rows, key=("retriever", "eval_set"),
                        title=RETRIEVAL_TITLE, note=RETRIEVAL_NOTE, render=lambda t: display_retrieval_table(t, ks))
    tests = recall_tests(evals, "dense", ks).assign(eval_set=eval_set)
    upsert_rows(profile_results_dir(profile) / f"{RECALL_TESTS}.csv", tests.to_dict("records"), key=("retriever", "k", "eval_set"),
                title="End-to-end training and the retriever",
                note=("Produced by notebook 07: answer recall@k of each query encoder trained end to end minus the encoder it "
                      "started from (all-MiniLM-L6-v2), on the same eval questions, passage embeddings fixed. Paired bootstrap "
                      "95% CI of the difference (1,000 resamples) and the exact McNemar p-value."))
    shown = [r["retriever"] for r in rows] + ["dense"]
    return QueryEncoderStudy(table[table["retriever"].isin(shown) & (table["eval_set"] == eval_set)], tests, evals, ctxs, questions)


def recall_tests(evals: dict[str, RetrievalEval], base: str, ks=KS, seed: int = 0) -> pd.DataFrame:
    """recall@k of every retriever minus `base`'s on the same questions: paired bootstrap CI and McNemar."""
    rows = []
    before = evals[base].recall(ks)
    for name, ev in evals.items():
        if name == base:
            continue
        if ev.question_ids != evals[base].question_ids:
            raise ValueError(f"{name} and {base} were evaluated on different questions")
        for k, after in ev.recall(ks).items():
            after, prior = after.astype(bool), before[k].astype(bool)
            test = paired_bootstrap_test(after.astype(float), prior.astype(float), seed=seed)
            rows.append({"retriever": name, "baseline": base, "k": k, "n": len(after), "baseline_recall": float(prior.mean()),
                         "recall": float(after.mean()), "diff": test["diff"], "diff_low": test["ci_low"], "diff_high": test["ci_high"],
                         "p_bootstrap": test["p_value"], "p_mcnemar": mcnemar_exact(after.astype(float), prior.astype(float))["p_value"],
                         "gained": int((after & ~prior).sum()), "lost": int((prior & ~after).sum())})
    return pd.DataFrame(rows)


def top1_changes(before: list[dict], after: list[dict], passages: Sequence[Passage] | Corpus, n: int = 8, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """From two runs' prediction rows on the same questions (a frozen retriever's, an end-to-end one's):
    the questions whose top-1 passage changed, gains first (did the old / new top-1 hold a gold answer,
    and was each answer right), and the counts over all questions."""
    if [r["id"] for r in before] != [r["id"] for r in after]:
        raise ValueError("top1_changes pairs two runs on the same questions, in the same order")
    holds, corpus = AnswerInPassage(), as_corpus(passages)
    changed = [(b, a) for b, a in zip(before, after)
               if a["passage_ids"] and b["passage_ids"] and a["passage_ids"][0] != b["passage_ids"][0]]
    tops = iter(corpus.take(corpus.rows_of([r["passage_ids"][0] for pair in changed for r in pair])) if changed else [])
    rows = []
    for b, a in changed:
        old, new = next(tops), next(tops)
        rows.append({"question": b["question"], "answer": b["answers"][0], "top-1 before": old.id, "held answer before": holds(b["answers"], old),
                     "top-1 after": new.id, "held answer after": holds(b["answers"], new),
                     "prediction before": b["prediction"], "prediction after": a["prediction"], "em before": b["em"], "em after": a["em"]})
    columns = ["question", "answer", "top-1 before", "held answer before", "top-1 after", "held answer after",
               "prediction before", "prediction after", "em before", "em after"]
    table = pd.DataFrame(rows, columns=columns)
    gained = table["held answer after"] & ~table["held answer before"] if len(table) else pd.Series([], dtype=bool)
    lost = table["held answer before"] & ~table["held answer after"] if len(table) else pd.Series([], dtype=bool)
    counts = {"questions": len(before), "top1_changed": len(table), "top1_gained_answer": int(gained.sum()),
              "top1_lost_answer": int(lost.sum())}
    if table.empty:
        return table.assign(change=[]), counts
    table["change"] = np.select([gained, lost], ["gained", "lost"], "neither")
    order = {"gained": 0, "lost": 1, "neither": 2}
    table = table.sample(frac=1.0, random_state=seed).sort_values("change", key=lambda c: c.map(order), kind="stable")
    return table.head(n).reset_index(drop=True), counts


def verdict(tests: pd.DataFrame, k: int = 5, alpha: float = 0.05) -> list[str]:
    """One sentence per trained encoder on recall@k, read off the paired test (the numbers decide)."""
    lines = []
    for row in tests[tests["k"] == k].itertuples():
        if row.p_bootstrap < alpha and row.diff > 0:
            word = "rose"
        elif row.p_bootstrap < alpha and row.diff < 0:
            word = "fell"
        else:
            word = "did not change significantly"
        lines.append(f"{row.retriever}: recall@{k} {word} ({row.baseline_recall:.3f} -> {row.recall:.3f}, diff {row.diff:+.3f} "
                     f"[{row.diff_low:+.3f}, {row.diff_high:+.3f}], p = {row.p_bootstrap:.3g}; {row.gained} questions gained, "
                     f"{row.lost} lost, n = {row.n})")
    return lines


# ---------------------------------------------------------------- notebook 07: its rows, computed or read

EXPERIMENTS = REPO_ROOT / "experiments"
OBJECTIVES = {"rag_sequence": "finetune_rag_rag_sequence", "rag_token": "finetune_rag_rag_token", "pdist": "finetune_rag_pdist"}
FROZEN = "finetune_rag_dense"  # the same reader fine-tuned over the frozen dense retriever
NAMES = (FROZEN, *OBJECTIVES.values())  # the notebook's rows, the frozen one first


@dataclass
class EndToEndRows:
    profile: str  # the profile the rows are read from / written to (smoke, or extended for every other)
    frozen: ExperimentConfig
    configs: dict[str, ExperimentConfig]  # objective -> its row's config
    table: pd.DataFrame  # the main-table rows of the eval set
    predictions: dict[str, list[dict]]  # experiment -> prediction rows
    training: dict[str, dict]  # experiment -> training.json

    @property
    def end_to_end_training(self) -> dict[str, dict]:
        """training.json of the end-to-end rows (the frozen row trains no retriever)."""
        return {name: self.training[name] for name in OBJECTIVES.values() if name in self.training}

    @property
    def k(self) -> int:
        return self.configs["rag_sequence"].retriever.k


def rows_profile(profile: str) -> str:
    """The rows need the dense index of the whole corpus and an hour of training: they run in the extended
    profile (smoke for seconds-scale checks); any other profile is an error naming the file and its `only_in`."""
    load_experiment(EXPERIMENTS / f"{FROZEN}.yaml", profile)
    return profile


def settings(profile: str) -> list[str]:
    """One line per row: what it trains, how, on how many questions."""
    lines, where = [], rows_profile(profile)
    for name in NAMES:
        c = load_experiment(EXPERIMENTS / f"{name}.yaml", where)
        t = c.training
        joint = f" (temperature {c.retriever.temperature}, query encoder lr {t.query_learning_rate})" if t.objective != "lm" else " (frozen)"
        lines.append(f"{name}: objective {t.objective}, reader reads {c.generator.combine}; dense top-{c.retriever.k}{joint}; "
                     f"lr {t.learning_rate}, {t.epochs} epoch(s), batch {t.batch_size}, n_train {c.data.n_train}, dev {t.dev_size}, "
                     f"eval n {c.data.n_eval}")
    return lines


def rows(profile: str, compute: bool = True, log=print) -> EndToEndRows:
    """The frozen-retriever row and the three end-to-end rows: run (each reused from the stage caches
    when already computed) when `compute`, else read from the profile's main table and run folders
    (an error naming the rows that are not there)."""
    where = rows_profile(profile)
    configs = {obj: load_experiment(EXPERIMENTS / f"{name}.yaml", where) for obj, name in OBJECTIVES.items()}
    frozen = load_experiment(EXPERIMENTS / f"{FROZEN}.yaml", where)
    if compute:
        for cfg in (frozen, *configs.values()):
            result = run_experiment(cfg, profile=where)
            log(f"{cfg.name}: EM {result.row['em']:.3f}, {({k: round(v) for k, v in result.timings.items() if v is not None})}")
    path = profile_results_dir(where) / "main_table.csv"
    table = load_table(path) if path.exists() else pd.DataFrame(columns=["experiment", "eval_set", "run"])
    missing = [n for n in NAMES if n not in set(table["experiment"])]
    if missing:
        raise FileNotFoundError(f"{path}: no row for {', '.join(missing)}; run notebook 07 with compute=True (profile {where})")
    eval_set = table.loc[table["experiment"] == FROZEN, "eval_set"].iloc[0]
    table = table[(table["eval_set"] == eval_set) & table["experiment"].isin(NAMES)].reset_index(drop=True)
    runs = dict(zip(table["experiment"], table["run"]))
    predictions = {name: load_predictions(run, where) for name, run in runs.items()}
    training = {name: json.loads((profile_results_dir(where) / run / "training.json").read_text(encoding="utf-8"))
                for name, run in runs.items()}
    return EndToEndRows(where, frozen, configs, table, predictions, training)


def row_tests(e2e: EndToEndRows) -> pd.DataFrame:
    """Each end-to-end row against the frozen-retriever row on the same questions (paired bootstrap, McNemar)."""
    pairs = [(FROZEN, name) for name in OBJECTIVES.values() if name in e2e.predictions]
    return paired_tests(e2e.predictions, pairs, metrics=("em", "match", "f1", "answer_in_passages"))


def retriever_recall(e2e: EndToEndRows, compute: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(recall@k rows of the starting and trained query encoders, beside notebook 01's contrastive `dense_ft`
    from this profile's or the extended profile's retrieval table; their paired tests). Computed by
    `query_encoder_study` on the whole eval split (smoke: the rows' own questions) when `compute`, which needs
    the trained encoders on disk; else read from the tables the study wrote."""
    finals = {obj: REPO_ROOT / e2e.training[name]["0"]["model"] for obj, name in OBJECTIVES.items() if name in e2e.training}
    base = profile_results_dir(e2e.profile)
    if compute:
        absent = [str(path / QUERY_ENCODER) for path in finals.values() if not (path / QUERY_ENCODER).is_dir()]
        if absent:
            raise FileNotFoundError(f"the trained query encoders are not on disk ({', '.join(absent)}): run the rows "
                                    "(end_to_end.rows(profile, compute=True)) or read the tables (compute=False)")
        cfg = e2e.configs["rag_sequence"]
        study = query_encoder_study(cfg, finals, e2e.profile, n_eval=cfg.data.n_eval if e2e.profile == "smoke" else None,
                                    show_progress=False)
        recall, tests = study.table, study.tests
    else:  # a fresh clone: the trained encoders are not committed, the tables they produced are
        table, tests = load_table(base / "retrieval.csv"), load_table(base / f"{RECALL_TESTS}.csv")
        recall = table[table["retriever"].str.startswith("dense") & table["eval_set"].isin(set(tests["eval_set"]))]
    contrastive = [load_table(p) for p in dict.fromkeys([base / "retrieval.csv", profile_results_dir("extended") / "retrieval.csv"])
                   if p.exists()]
    contrastive = pd.concat([t[t["retriever"] == "dense_ft"] for t in contrastive]) if contrastive else pd.DataFrame(columns=["eval_set"])
    contrastive = contrastive[contrastive["eval_set"].isin(set(recall["eval_set"]))]
    return pd.concat([recall, contrastive]).drop_duplicates("retriever").reset_index(drop=True), tests


def findings(e2e: EndToEndRows, tests: pd.DataFrame, recall_tests: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The notebook's conclusions, read off the numbers: each row against the frozen one (EM, answer in the
    passages read), each trained encoder's recall@5, the signal training had, the entropy each objective reached."""
    lines = []
    for row in tests[tests["metric"].isin(["em", "answer_in_passages"])].itertuples():
        word = "higher" if row.diff > 0 else "lower" if row.diff < 0 else "equal"
        sig = "significant" if row.p_bootstrap < alpha else "not significant"
        lines.append(f"{row.system} vs {row.baseline}: {row.metric} {row.system_mean:.3f} vs {row.baseline_mean:.3f} ({word}, "
                     f"diff {row.diff:+.3f} [{row.diff_low:+.3f}, {row.diff_high:+.3f}], {sig}, n = {row.n})")
    lines += verdict(recall_tests, k=5, alpha=alpha)
    k = e2e.k
    recall_frozen = float(np.mean([bool(r["answer_in_passages"]) for r in e2e.predictions[FROZEN]]))
    lines.append(f"The signal: {recall_frozen:.1%} of the eval questions have a gold answer in any of the frozen top-{k}; for "
                 "the rest the objectives can only move weight among passages none of which holds the answer.")
    for name in OBJECTIVES.values():
        if name in e2e.training:
            info = e2e.training[name]["0"]
            curve = info["passage_entropy"] or []
            span = f"{curve[0]['passage_entropy']:.2f} -> {curve[-1]['passage_entropy']:.2f} nats" if curve else "not logged"
            lines.append(f"{name}: {info['global_step']} steps on {info['n_train']} questions; passage-weight entropy {span} "
                         f"(uniform: {np.log(k):.2f})")
    lines.append("Fusion-in-Decoder needs an encoder-decoder reader; none ships in a PyPI wheel reachable offline, so its row is "
                 "the full-scale config experiments/full/fid_flan_t5.yaml (FLAN-T5 from the hub); its code is tested on tiny T5 models.")
    return lines


def top1_examples(e2e: EndToEndRows, n: int = 6) -> dict[str, tuple[pd.DataFrame, dict]]:
    """For each end-to-end row: `top1_changes` against the frozen row, over the rows' memory-mapped corpus."""
    d = e2e.frozen.data
    passages = corpus_for(d, subset_questions(load_qa(d.dataset, d.eval_split), d.n_eval, d.subset_seed))
    return {name: top1_changes(e2e.predictions[FROZEN], e2e.predictions[name], passages, n=n)
            for name in OBJECTIVES.values() if name in e2e.predictions}
