"""Every numbered notebook runs top to bottom in the smoke profile under a real kernel (papermill)."""
from pathlib import Path

import nbformat
import pytest

from rag_lab.notebooks import numbered_notebooks, portable_outputs, run_notebook
from rag_lab.paths import REPO_ROOT

NOTEBOOKS = numbered_notebooks()


def test_there_are_notebooks():
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(notebook):
    out = run_notebook(notebook, "smoke")  # papermill raises PapermillExecutionError on any cell error
    executed = nbformat.read(out, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # what a committed notebook may not carry (issue 22, item 6): this machine's paths, progress-bar fragments,
    # and the warnings that are ours to fix
    text = out.read_text(encoding="utf-8")
    for unwanted in (str(REPO_ROOT), str(Path.home()) + "/", "it/s]", "%|", "TqdmWarning", "LOAD REPORT",
                     "missing keys in the checkpoint model loaded: ['lm_head.weight']"):
        assert unwanted not in text, unwanted


def test_committed_outputs_are_made_portable(tmp_path):
    """What `portable_outputs` does to a notebook run elsewhere: paths relative, bars gone, the rest kept."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"input_path": "/x/repo/notebooks/01_a.ipynb", "output_path": "/x/repo/notebooks/.01_a.ipynb.tmp.ipynb"}
    nb.cells = [nbformat.v4.new_code_cell("print(1)", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="encode:   0%|          | 0/5 [00:00<?, ?it/s]\rencode: 100%|####| 5/5 [00:01<00:00, 4.9it/s]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="corpus: 3 passages [00:00, 13617.87 passages/s]\nreal warning\n"),
        nbformat.v4.new_output("stream", name="stdout", text="best checkpoint /x/repo/cache/train/run/checkpoint-38\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "'/x/repo'"}, execution_count=1)])]
    path = tmp_path / "01_a.ipynb"
    nbformat.write(nb, str(path))
    portable_outputs(path, root=Path("/x/repo"))
    done = nbformat.read(str(path), as_version=4)
    outputs = done.cells[0].outputs
    assert [o.get("text") for o in outputs[:2]] == ["real warning\n", "best checkpoint cache/train/run/checkpoint-38\n"]
    assert outputs[2].data["text/plain"] == "'.'"
    assert done.metadata.papermill == {"input_path": "notebooks/01_a.ipynb", "output_path": "notebooks/01_a.ipynb"}


def test_unknown_profile_fails_in_the_first_cell(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="unknown profile 'huge'"):
        pm.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "out.ipynb"), parameters={"profile": "huge"},
                            kernel_name="python3", cwd=str(NOTEBOOKS[0].parent), progress_bar=False)
