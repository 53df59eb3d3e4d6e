from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(workdir, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_HOME", str(workdir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "best val score" in outputs and "Searched minus uniform" in outputs
    code = [c for c in nb.cells if c.cell_type == "code"]
    images = [[o for o in c.get("outputs", []) if "image/png" in o.get("data", {})] for c in code]
    # Two figures, each shown once: a figure returned by a cell is not shown again by the inline backend.
    assert [len(shown) for shown in images if shown] == [1, 1]
    stderr = "".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert "IProgress" not in stderr and "ipywidgets" not in stderr, stderr
    assert (workdir / "best_plan.json").is_file()
