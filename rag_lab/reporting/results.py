"""Results tables: rows upserted into a CSV (under a file lock) and rendered to Markdown, and the
display helpers that turn each table's numeric columns into the cells people read.

Several runs may update one table at once; the lock makes each read-modify-write whole,
and the atomic write means a reader never sees half a table.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from filelock import FileLock

from rag_lab.config import REGIMES, ExperimentConfig
from rag_lab.io import CacheRepaired, atomic_write_text
from rag_lab.metrics import format_ci
from rag_lab.paths import profile_results_dir

MAIN_TABLE_KEY = ("experiment", "eval_set")
KS = (1, 5, 10, 20, 100)  # the recall@k cut-offs of results/retrieval.*


def upsert_rows(csv_path: str | Path, rows: Sequence[dict] | Callable[[], Sequence[dict]], key: Sequence[str], title: str = "", note: str = "",
                render: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                order: Callable[[pd.DataFrame], pd.DataFrame] | None = None, replace_all: bool = False) -> pd.DataFrame:
    """Insert or replace `rows` (matched on the `key` columns) in `csv_path`; rewrite the .md beside it
    (through `render`, which turns the numeric table into the one people read). `order` sorts the
    rows (default: where they were inserted). `replace_all`: the table becomes `rows` alone, in one
    atomic write under the lock (a reader never finds it missing); no rows then removes it. `rows` may
    be a function, called under the lock (what it reads cannot change before the write)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(csv_path) + ".lock"):
        rows = rows() if callable(rows) else rows
        if replace_all and not rows:
            for stale in (csv_path, csv_path.with_suffix(".md")):
                stale.unlink(missing_ok=True)
            return pd.DataFrame()
        table = _readable_or_set_aside(csv_path) if csv_path.exists() and not replace_all else pd.DataFrame()
        new = pd.DataFrame(list(rows))
        if not table.empty and not new.empty:
            new_keys = set(map(tuple, new[list(key)].astype(str).values))
            keep = [tuple(r) not in new_keys for r in table[list(key)].astype(str).values]
            table = table[keep]
        table = pd.concat([table, new], ignore_index=True) if not table.empty else new
        if order is not None:
            table = order(table).reset_index(drop=True)
        buf = io.StringIO()
        _counts_as_integers(table).to_csv(buf, index=False)
        atomic_write_text(csv_path, buf.getvalue())
        shown = render(table) if render else table
        atomic_write_text(csv_path.with_suffix(".md"), to_markdown(shown, title, note))
    return table


# counts in any results table: a row without one (NaN) turns pandas' column to float, and the CSV would say
# `135.0`; they are written as integers with an empty cell for the missing
COUNT_COLUMNS = ("n", "k", "n_in_corpus", "n_answer_in_corpus", "truncated", "budget", "depth", "flops",
                 "system only right", "baseline only right", "n for 80% power")


def _counts_as_integers(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in COUNT_COLUMNS:
        if col in out and pd.api.types.is_float_dtype(out[col]):
            values = out[col].dropna()
            if (values == values.round()).all():
                out[col] = out[col].astype("Int64")
    return out


def _readable_or_set_aside(csv_path: Path) -> pd.DataFrame:
    """The table in `csv_path`; one that cannot be read (cut off, not CSV, not UTF-8) is moved aside to
    `<name>.damaged` and an empty table returned, saying so (a derived table must not stop a finished run)."""
    try:
        return load_table(csv_path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        aside = csv_path.with_name(csv_path.name + ".damaged")
        os.replace(csv_path, aside)
        warnings.warn(f"{csv_path}: unreadable ({type(e).__name__}); kept as {aside.name}, starting it again",
                      CacheRepaired, stacklevel=3)
        return pd.DataFrame()


def to_markdown(table: pd.DataFrame, title: str = "", note: str = "") -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    parts = ([f"# {title}", ""] if title else []) + ([note, ""] if note else []) + [head, rule, *body]
    return "\n".join(parts) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        if pd.isna(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def load_table(csv_path: str | Path) -> pd.DataFrame:
    """A results CSV as written: only an empty cell is missing (an experiment named "NA", "null" or
    "None" stays that name; pandas' default would read it as a missing value)."""
    return pd.read_csv(csv_path, keep_default_na=False, na_values=[""])


def ci_column(table: pd.DataFrame, col: str) -> list[str]:
    """'mean [low, high]' strings from the numeric `col`, `col_low`, `col_high` columns ('' where missing)."""
    if col not in table:
        return [""] * len(table)
    return ["" if pd.isna(m) else format_ci(m, l, h) for m, l, h in zip(table[col], table[col + "_low"], table[col + "_high"])]


# ---------------------------------------------------------------- results/main_table.*

# answer_in_passages counts the passages packed into the prompt (what the reader saw); answer_in_retrieved
# all k the retriever returned. A run folder from before the split has only the first (over all k).
METRIC_COLUMNS = {"answer_in_passages": "in_prompt", "answer_in_retrieved": "recall@k"}


def table_row(cfg: ExperimentConfig, metrics: dict, eval_set: str, wall_s: float | None, run: str) -> dict:
    """One row of results/main_table.csv; `wall_s` is the time computing the row took (stages reused
    from a cache count what they took when computed; None if unknown); `run` is the run folder
    relative to the profile's results folder."""
    r = cfg.retriever
    row = {"block": cfg.block, "experiment": cfg.name, "regime": cfg.regime, "generator": Path(cfg.generator.model).name,
           "backend": cfg.generator.backend if cfg.generator.kind == "decoder" else "",
           "retriever": r.kind if r.kind != "none" else "", "k": r.k if r.kind != "none" else "",
           "context": context_label(cfg) if r.kind != "none" else "",
           "eval_set": eval_set, "n": metrics["all"]["n"]}
    for subset, suffix in (("all", ""), ("in_corpus", "_in_corpus")):
        block = metrics.get(subset)
        if block is None:
            continue
        if suffix:
            row["n_in_corpus"] = block["n"]
        for m in ("em", "f1", "match", "answer_in_passages", "answer_in_retrieved"):
            if m in block:
                col = METRIC_COLUMNS.get(m, m) + suffix
                row[col], row[col + "_low"], row[col + "_high"] = block[m]["mean"], block[m]["low"], block[m]["high"]
    seeds = metrics["seeds"]
    if cfg.training.enabled:  # variation over training seeds only means something for trained rows
        for m in ("em", "f1", "match"):
            row[f"{m}_seed_mean"], row[f"{m}_seed_sd"] = seeds[m]["mean"], seeds[m]["sd"]
    row.update({"truncated": metrics["truncated"], "wall_s": None if wall_s is None else round(wall_s, 1), "seeds": " ".join(map(str, seeds["seeds"])),
                "run": run})
    return row


def context_label(cfg: ExperimentConfig) -> str:
    """What the reader was given to read: passage granularity and the context budget."""
    passages = f"windows<={cfg.data.window_words}w" if cfg.data.window_words else "passages<=100w"
    budget = cfg.generator.max_context_tokens
    return passages + (f", {budget} tokens" if budget else "")


def display_main_table(table: pd.DataFrame) -> pd.DataFrame:
    """'mean [low, high]' cells for reading; the CSV keeps the numbers."""
    def ci(col):
        return ci_column(table, col)

    columns = [c for c in ("block", "experiment", "regime", "generator", "backend", "retriever", "k", "context", "eval_set", "n") if c in table]
    out = table[columns].fillna("").copy()
    for col, label in (("em", "EM"), ("f1", "F1"), ("match", "answer match"), ("recall@k", "answer recall@k"),
                       ("in_prompt", "answer in prompt")):
        out[label] = ci(col)
    out["n (in corpus)"] = table["n_in_corpus"] if "n_in_corpus" in table else ""
    for col, label in (("em_in_corpus", "EM (in corpus)"), ("f1_in_corpus", "F1 (in corpus)"),
                       ("match_in_corpus", "match (in corpus)"), ("in_prompt_in_corpus", "in prompt (in corpus)")):
        out[label] = ci(col)
    out["seeds"] = table["seeds"].astype(str) if "seeds" in table else ""
    if "em_seed_mean" in table:
        trained = table["regime"].map(lambda r: r in REGIMES and REGIMES[r].trains)
        out["EM mean ± sd over seeds"] = [
            f"{m:.3f} ± {s:.3f}" if t and not pd.isna(m) else ""
            for m, s, t in zip(table["em_seed_mean"], table["em_seed_sd"], trained)]
    out["wall s"] = ["" if pd.isna(w) else f"{w:.0f}" for w in table["wall_s"]]
    return out


def upsert_main_table(rows: list[dict] | Callable[[], list[dict]], profile: str = "default", replace_all: bool = False) -> pd.DataFrame:
    """Insert/replace rows of results/main_table.csv and re-render main_table.md (no rows: re-render only;
    `replace_all`: the table becomes `rows`)."""
    return upsert_rows(profile_results_dir(profile) / "main_table.csv", rows, key=MAIN_TABLE_KEY, replace_all=replace_all,
                       title="Main results: every regime on the same eval set",
                       note=("One row per experiment, produced by `rag-lab run experiments/<experiment>.yaml` "
                             "(or the notebooks). EM / F1 / answer match with 95% bootstrap CIs (1,000 resamples); "
                             "answer recall@k = a gold answer occurs in the k passages retrieved; answer in prompt = in the "
                             "passages packed into the reader's prompt (the context budget cuts the rest); 'in corpus' = "
                             "questions whose answer occurs somewhere in the corpus. Greedy decoding."),
                       render=display_main_table, order=in_regime_order)


REGIME_ORDER = tuple(REGIMES)  # the order of the comparison


def in_regime_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by block, then in the order the comparison reads: closed-book, fine-tuned, RAG, RAG
    fine-tuned, reader, oracle; within a regime by experiment name, numbers compared as numbers (k1, k3, k5, k10)."""
    def key(row) -> tuple:
        regime = REGIME_ORDER.index(row["regime"]) if row["regime"] in REGIME_ORDER else len(REGIME_ORDER)
        name = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(row["experiment"])) if t)
        block = row["block"] if "block" in row and isinstance(row["block"], str) else ""
        return block, regime, name

    return table.iloc[sorted(range(len(table)), key=lambda i: key(table.iloc[i]))]


# ---------------------------------------------------------------- results/retrieval.* and recall_budget.*

def display_retrieval_table(table: pd.DataFrame, ks: Sequence[int] = KS) -> pd.DataFrame:
    """The CSV's numeric columns folded into 'mean [low, high]' strings for reading."""
    out = table[["retriever", "eval_set", "n"]].copy()
    for k in ks:
        out[f"R@{k}"] = ci_column(table, f"R@{k}")
    out["n (answer in corpus)"] = table["n_answer_in_corpus"]
    for k in ks:
        out[f"R@{k} (in corpus)"] = ci_column(table, f"R@{k}_in_corpus")
    out["config"] = table["config"]
    return out


def display_budget_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per setting, one 'mean [low, high]' column per budget."""
    out = {}
    for (setting, eval_set), group in table.groupby(["setting", "eval_set"], sort=False):
        row = {"setting": setting, "eval_set": eval_set, "n": int(group["n"].iloc[0])}
        for r in group.sort_values("budget").itertuples():
            row[f"{int(r.budget)} tokens"] = format_ci(r.recall, r.recall_low, r.recall_high)
        out[setting, eval_set] = row
    return pd.DataFrame(list(out.values()))
