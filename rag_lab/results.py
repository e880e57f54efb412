"""Results tables: rows upserted into a CSV (under a file lock) and rendered to Markdown.

Several runs may update one table at once; the lock makes each read-modify-write whole,
and the atomic write means a reader never sees half a table.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from filelock import FileLock

from rag_lab.io import atomic_write_text


def upsert_rows(csv_path: str | Path, rows: Sequence[dict], key: Sequence[str], title: str = "", note: str = "",
                render: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                order: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Insert or replace `rows` (matched on the `key` columns) in `csv_path`; rewrite the .md beside it
    (through `render`, which turns the numeric table into the one people read). `order` sorts the
    rows (default: where they were inserted)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(csv_path) + ".lock"):
        table = pd.read_csv(csv_path) if csv_path.exists() else pd.DataFrame()
        new = pd.DataFrame(list(rows))
        if not table.empty and not new.empty:
            new_keys = set(map(tuple, new[list(key)].astype(str).values))
            keep = [tuple(r) not in new_keys for r in table[list(key)].astype(str).values]
            table = table[keep]
        table = pd.concat([table, new], ignore_index=True) if not table.empty else new
        if order is not None:
            table = order(table).reset_index(drop=True)
        buf = io.StringIO()
        table.to_csv(buf, index=False)
        atomic_write_text(csv_path, buf.getvalue())
        shown = render(table) if render else table
        atomic_write_text(csv_path.with_suffix(".md"), to_markdown(shown, title, note))
    return table


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
    return pd.read_csv(csv_path)


def ci_column(table: pd.DataFrame, col: str) -> list[str]:
    """'mean [low, high]' strings from the numeric `col`, `col_low`, `col_high` columns ('' where missing)."""
    from rag_lab.metrics import format_ci

    if col not in table:
        return [""] * len(table)
    return ["" if pd.isna(m) else format_ci(m, l, h) for m, l, h in zip(table[col], table[col + "_low"], table[col + "_high"])]
