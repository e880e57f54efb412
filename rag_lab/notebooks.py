"""Execute the numbered notebooks with papermill, one profile for all of them.

The default profile executes each notebook in place, so the committed notebooks carry
the outputs of the default run. Other profiles (smoke) write to results/<profile>/notebooks/
and leave the committed notebooks untouched.
"""
from __future__ import annotations

import time
from pathlib import Path

import papermill as pm

from rag_lab.paths import REPO_ROOT, results_dir
from rag_lab.timings import StageTiming, record

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Notebooks that do not run in every profile: notebook 07 trains the end-to-end rows, which need the dense index
# of the whole corpus (~1 h to encode on the int8 engine) and an hour of training: beyond the default hour.
NOTEBOOK_PROFILES = {"07_end_to_end_rag": ("smoke", "extended", "full")}


def numbered_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def output_path(notebook: Path, profile: str) -> Path:
    return notebook if profile == "default" else results_dir() / profile / "notebooks" / notebook.name


def run_notebook(notebook: Path, profile: str, kernel: str = "python3") -> Path:
    """Execute one notebook with `profile` injected into its `parameters` cell; return the output path."""
    out = output_path(notebook, profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.ipynb")  # atomic: a failed run leaves the old notebook
    pm.execute_notebook(str(notebook), str(tmp), parameters={"profile": profile}, kernel_name=kernel,
                        cwd=str(notebook.parent), progress_bar=False)
    tmp.replace(out)
    return out


def run_notebooks(profile: str = "default", notebooks: list[Path] | None = None) -> list[Path]:
    notebooks = numbered_notebooks() if notebooks is None else notebooks
    if not notebooks:
        print("no numbered notebooks in notebooks/ yet")

    outputs = []
    for i, nb in enumerate(notebooks, start=1):
        if profile not in NOTEBOOK_PROFILES.get(nb.stem, (profile,)):
            print(f"skipped {nb.name} [{profile}]: it runs in the {', '.join(NOTEBOOK_PROFILES[nb.stem])} profile(s)")
            continue
        print(f"running {nb.name} [{profile}] ({i} of {len(notebooks)}) ...", flush=True)  # the kernel's output is in the notebook
        t0 = time.perf_counter()
        outputs.append(run_notebook(nb, profile))
        seconds = time.perf_counter() - t0
        record(StageTiming(f"notebook {nb.stem}", seconds, note="the kernel's whole run: its rows and indexes are lines of their own"), profile)
        print(f"executed {nb.name} [{profile}] in {seconds:.0f} s -> {outputs[-1]}")
    return outputs
