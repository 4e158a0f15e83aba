"""Every notebook runs top to bottom (outputs are not committed).

The notebooks are split between this file and ``test_notebooks_workflows.py`` so that a parallel
run (``pytest -n 2``, one worker per file) can put them on different workers.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: The longer end-to-end notebooks, run by test_notebooks_workflows.py.
WORKFLOWS = {"05_distillation.ipynb", "06_optuna_search.ipynb", "07_text_to_image_digits.ipynb"}


def run_notebook(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the grid and the loss plot


def test_there_are_notebooks():
    assert NOTEBOOKS and {path.name for path in NOTEBOOKS} >= WORKFLOWS


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in WORKFLOWS], ids=lambda p: p.name)
def test_notebook_runs_and_is_committed_without_outputs(path):
    run_notebook(path)
