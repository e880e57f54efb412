"""Keep the README's results section generated from results/, never typed by hand.

    rag-lab readme          # rewrite the blocks between the markers below

The README holds `<!-- BEGIN name -->` ... `<!-- END name -->` blocks; each is replaced by the
table in the named results file (the part after its title and note).
"""
from __future__ import annotations

import re
from pathlib import Path

from rag_lab.io import atomic_write_text
from rag_lab.paths import REPO_ROOT, results_dir

BLOCKS = {"main-table": "main_table.md", "headline-table": "headline.md", "findings": "findings.md",
          "retrieval-table": "retrieval.md", "recall-budget-table": "recall_budget.md", "timings-table": "timings.md"}


def table_part(markdown: str) -> str:
    """The Markdown table of a results .md file (its lines starting with '|'), or its list (lines
    starting with '- ') for the generated findings."""
    lines = markdown.splitlines()
    keep = [line for line in lines if line.startswith("|")] or [line for line in lines if line.startswith("- ")]
    return "\n".join(keep) + "\n"


def render_blocks(readme: str, results: Path) -> str:
    for name, filename in BLOCKS.items():
        path = results / filename
        if not path.exists():
            continue
        body = table_part(path.read_text(encoding="utf-8"))
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)
    return readme


def generated_pages(root: Path = REPO_ROOT) -> list[Path]:
    """The pages that hold generated blocks: the README and the long sections moved to docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def update_readme(pages: list[Path] | None = None, results: Path | None = None) -> bool:
    """Rewrite the generated blocks of every page (README.md, docs/*.md); True if one changed."""
    changed = False
    for page in pages or generated_pages():
        old = page.read_text(encoding="utf-8")
        new = render_blocks(old, results or results_dir())
        if new != old:
            atomic_write_text(page, new)
            changed = True
    return changed
