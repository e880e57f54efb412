"""Execute the numbered notebooks with papermill, one profile for all of them.

The default profile executes each notebook in place, so the committed notebooks carry
the outputs of the default run. Other profiles (smoke) write to results/<profile>/notebooks/
and leave the committed notebooks untouched.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import papermill as pm

from rag_lab.io import atomic_write_text
from rag_lab.paths import REPO_ROOT, results_dir
from rag_lab.reporting.timings import StageTiming, record

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Notebooks that do not run in every profile: notebook 07 trains the end-to-end rows, which need the dense index
# of the whole corpus (~1 h to encode on the int8 engine) and an hour of training: beyond the default hour.
NOTEBOOK_PROFILES = {"07_end_to_end_rag": ("smoke", "extended")}


def numbered_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def output_path(notebook: Path, profile: str) -> Path:
    return notebook if profile == "default" else results_dir() / profile / "notebooks" / notebook.name


def run_notebook(notebook: Path, profile: str, kernel: str = "python3") -> Path:
    """Execute one notebook with `profile` injected into its `parameters` cell; return the output path."""
    out = output_path(notebook, profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.ipynb")  # atomic: a failed run leaves the old notebook
    # The kernel inherits TQDM_DISABLE: progress bars drawn into a saved notebook are carriage-return fragments;
    # its printed lines (which stage is running) stream to this terminal instead.
    with _environment(TQDM_DISABLE="1"):
        pm.execute_notebook(str(notebook), str(tmp), parameters={"profile": profile}, kernel_name=kernel,
                            cwd=str(notebook.parent), progress_bar=False, stdout_file=sys.stdout)
    portable_outputs(tmp)
    tmp.replace(out)
    return out


def portable_outputs(path: Path, root: Path = REPO_ROOT) -> None:
    """Rewrite a notebook's outputs as they should be committed: the machine's absolute paths relative
    (the repository's to it, the home folder to `~`), and no progress-bar fragments on stderr (a
    notebook executed before TQDM_DISABLE was set holds hundreds)."""
    nb = nbformat.read(str(path), as_version=4)
    swaps = [(str(root) + "/", ""), (str(root), "."), (str(Path.home()) + "/", "~/")]

    def clean(text):
        if isinstance(text, list):
            return [clean(t) for t in text]
        for old, new in swaps:
            text = text.replace(old, new)
        return text

    for cell in nb.get("cells", []):
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                output["text"] = _without_bars(output["text"])
                if not output["text"]:
                    continue
            for key in ("text", "traceback"):
                if key in output:
                    output[key] = clean(output[key])
            for mime in ("text/plain", "text/markdown", "text/html"):
                if mime in output.get("data", {}):
                    output["data"][mime] = clean(output["data"][mime])
            outputs.append(output)
        if "outputs" in cell:
            cell["outputs"] = outputs
    run = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):  # the output is named as committed, not as the temp file it was written to
        if isinstance(run.get(key), str):
            run[key] = re.sub(r"(^|/)\.([^/]+\.ipynb)\.tmp\.ipynb$", r"\1\2", clean(run[key]))
    atomic_write_text(path, nbformat.writes(nb))


BAR = re.compile(r"\d+%\|.*\||\[\d\d:\d\d(:\d\d)?(<[^,\]]*)?, [^\]]*(it/s|s/it|/s)\]")  # tqdm's "42%|███ |" or "[00:03<00:10, 5.1it/s]"


def _without_bars(text: str) -> str:
    """stderr text without tqdm's lines: each \\r-separated segment that is a bar goes."""
    lines = []
    for line in text.split("\n"):
        kept = [seg for seg in line.split("\r") if seg.strip() and not BAR.search(seg)]
        if kept or (line == "" and lines and lines[-1] != ""):
            lines.append(kept[-1] if kept else "")
    return "\n".join(lines).strip("\n") + ("\n" if any(lines) else "")


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
