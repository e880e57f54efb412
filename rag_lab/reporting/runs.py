"""Run folders and the main table they stand for, without torch: `rag-lab table` and `rag-lab runs`
read and repair them in a fraction of a second, and the runner writes them through here.

    results/<profile>/runs/<experiment>/<run id>/   config, predictions, metrics, timings, versions
    results/<profile>/main_table.{csv,md}           one row per (experiment, eval set), each naming its run folder

`check_run_folder` says what is wrong with one folder, `main_table_problem` with the table (duplicated
rows, cells that differ from their folder, a row without a folder, a folder without a row), and
`repair_main_table` rebuilds it from the folders when it cannot be trusted.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from rag_lab.config import ConfigError, ExperimentConfig, from_dict
from rag_lab.data.subsets import eval_set_name
from rag_lab.io import UserError, atomic_dir, read_jsonl, write_json, write_jsonl
from rag_lab.paths import REPO_ROOT, profile_results_dir
from rag_lab.reporting.results import MAIN_TABLE_KEY, load_table, table_row, upsert_main_table


def _version(package: str) -> str:
    """A package's installed version, read from its metadata (importing torch to ask would take seconds)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "rag_lab"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", False
    return {"python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
            "rag_lab_git_sha": sha + ("+dirty" if dirty else ""), "platform": platform.platform()}


RUN_FILES = ("config.json", "predictions.jsonl", "metrics.json", "timings.json", "versions.json")


def write_run_folder(cfg, profile: str, key: str, rows, metrics, timings, training: dict | None = None,
                     leak_check: dict | None = None) -> Path:
    """results/runs/<name>/<key[:12]>/, written into a temporary folder and renamed: it appears only complete."""
    root = profile_results_dir(profile) / "runs"
    run_dir = root / cfg.name / key[:12]
    if not run_dir.resolve().is_relative_to(root.resolve()):  # names are checked at load; a config built in code too
        raise ConfigError(f"name {cfg.name!r}: the run folder {run_dir} would lie outside {root}")
    with atomic_dir(run_dir) as tmp:
        if training:
            write_json(tmp / "training.json", training)
        if leak_check:
            write_json(tmp / "leak_check.json", leak_check)
        write_json(tmp / "config.json", {"profile": profile, **cfg.to_dict()})
        write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "timings.json", {k: None if v is None else round(v, 2) for k, v in timings.items()})
        write_json(tmp / "versions.json", versions())
    return run_dir


def run_folders(profile: str = "default") -> list[Path]:
    root = profile_results_dir(profile) / "runs"
    return sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def check_run_folder(run_dir: Path) -> str | None:
    """What is wrong with a run folder (None: complete and consistent)."""
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        return f"incomplete: no {', '.join(missing)}"
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        n_rows = sum(1 for _ in read_jsonl(run_dir / "predictions.jsonl"))
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        json.loads((run_dir / "timings.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return f"unreadable: {e}"
    if not isinstance(metrics, dict) or not isinstance(cfg, dict):
        return "unreadable: metrics.json and config.json must hold JSON objects"
    if metrics.get("all", {}).get("n") != n_rows:
        return f"inconsistent: metrics.json says n={metrics.get('all', {}).get('n')}, predictions.jsonl has {n_rows} rows"
    if cfg.get("name") != run_dir.parent.name:
        return f"inconsistent: config.json names {cfg.get('name')!r}, the folder {run_dir.parent.name!r}"
    try:  # a folder whose row cannot be built is reported, never allowed to stop every later run
        _folder_row(run_dir, run="")
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def _folder_row(run_dir: Path, run: str) -> dict:
    raw = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    raw.pop("profile", None)
    cfg = from_dict(ExperimentConfig, raw, where=str(run_dir / "config.json"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    compute_s = json.loads((run_dir / "timings.json").read_text(encoding="utf-8")).get("compute_s")
    return table_row(cfg, metrics, eval_set_name(cfg.data, metrics["all"]["n"]), compute_s, run)


def row_from_run_folder(run_dir: Path, profile: str) -> dict:
    """The main-table row a complete run folder stands for (what `run_experiment` upserted)."""
    return _folder_row(run_dir, run_dir.relative_to(profile_results_dir(profile)).as_posix())


def main_table_problem(profile: str = "default", pending: Path | None = None) -> str | None:
    """Why results/main_table.csv cannot be trusted (None: it can): unreadable, a header without
    the key and metric columns, rows with empty key or metric cells (a truncated file), two rows for
    one (experiment, eval set), a row whose run folder is missing or incomplete or whose cells differ
    from what that folder gives, or no row for a complete run folder."""
    path = profile_results_dir(profile) / "main_table.csv"
    folders = [d for d in run_folders(profile) if check_run_folder(d) is None and d != pending]
    if not path.exists():
        return f"{path} is missing but {len(folders)} run folders exist" if folders else None
    try:
        table = load_table(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    needed = [*MAIN_TABLE_KEY, "regime", "n", "em", "f1", "run"]
    absent = [c for c in needed if c not in table.columns]
    if absent:
        return f"{path} has no {', '.join(absent)} column"
    if table[needed].isna().any().any():
        return f"{path} has rows with empty key or metric cells (a truncated file?)"
    root = profile_results_dir(profile)
    expected = {d.relative_to(root).as_posix(): row_from_run_folder(d, profile) for d in folders}
    keys = list(zip(table["experiment"].astype(str), table["eval_set"].astype(str)))
    if len(set(keys)) < len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        return f"{path} has {keys.count(twice)} rows for {twice[0]} ({twice[1]})"
    pending_run = pending.relative_to(root).as_posix() if pending is not None and pending.is_relative_to(root) else None
    for (experiment, eval_set), record in zip(keys, table.to_dict("records")):
        run = str(record["run"])
        if run == pending_run:
            continue
        if run not in expected:
            return f"{path}: the row of {experiment} ({eval_set}) names run folder {run}, which is missing or incomplete"
        # every cell but the row's seconds (rounded from the run's unrounded total, not from timings.json)
        differs = [c for c, v in expected[run].items() if c in record and c != "wall_s" and not _same_cell(v, record[c])]
        if differs:
            return f"{path}: the row of {experiment} ({eval_set}) differs from its run folder {run} in {', '.join(differs[:4])}"
    have = set(keys)
    lacking = [run for run, row in expected.items() if (row["experiment"], row["eval_set"]) not in have]
    if lacking:
        return f"{path} has no row for {len(lacking)} run folder(s), e.g. {root / lacking[0]}"
    return None


def _same_cell(expected, cell) -> bool:
    """A table cell read back from the CSV against the value its run folder gives (floats to 1e-9)."""
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v)) or v == ""  # noqa: E731
    if missing(expected) or missing(cell):
        return missing(expected) and missing(cell)
    if isinstance(expected, bool) or isinstance(cell, bool):
        return str(expected).lower() == str(cell).lower()
    if isinstance(expected, (int, float)) and isinstance(cell, (int, float, np.integer, np.floating)):
        return math.isclose(float(expected), float(cell), rel_tol=1e-9, abs_tol=1e-12)
    return str(expected) == str(cell)


def rebuild_main_table(profile: str = "default") -> pd.DataFrame:
    """results/main_table.{csv,md} rebuilt from the complete run folders: per (experiment, eval set)
    the most recently written folder. The folders are read and the table replaced in one atomic write,
    both under the table's lock: a concurrent reader or upsert never finds it missing, and a run that
    upserts meanwhile waits; no complete run folder: no table, not an empty one."""
    def latest_rows() -> list[dict]:
        latest: dict[tuple[str, str], tuple[float, dict]] = {}
        for d in run_folders(profile):
            if check_run_folder(d) is None:
                row = row_from_run_folder(d, profile)
                stamp = (d / "metrics.json").stat().st_mtime
                key = (row["experiment"], row["eval_set"])
                if key not in latest or stamp > latest[key][0]:
                    latest[key] = (stamp, row)
        return [row for _, row in latest.values()]

    return upsert_main_table(latest_rows, profile, replace_all=True)


def repair_main_table(profile: str = "default", pending: Path | None = None) -> str | None:
    """Rebuild the main table when `main_table_problem` finds one (`pending`: a run folder whose row is
    about to be upserted, not a problem); returns (and prints) what was wrong."""
    problem = main_table_problem(profile, pending)
    if problem:
        print(f"rag-lab: {problem}: rebuilding it from the run folders", file=sys.stderr)
        rebuild_main_table(profile)
    return problem
