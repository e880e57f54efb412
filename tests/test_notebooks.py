"""Every numbered notebook runs top to bottom in the smoke profile under a real kernel (papermill)."""
import nbformat
import pytest

from rag_lab.notebooks import numbered_notebooks, run_notebook

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


def test_unknown_profile_fails_in_the_first_cell(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="unknown profile 'huge'"):
        pm.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "out.ipynb"), parameters={"profile": "huge"},
                            kernel_name="python3", cwd=str(NOTEBOOKS[0].parent), progress_bar=False)
