"""The longer notebooks (distillation, the Optuna search, the text-to-image digits) run top to bottom."""

import pytest

from tests.test_notebooks import NOTEBOOKS, WORKFLOWS, run_notebook


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in WORKFLOWS], ids=lambda p: p.name)
def test_notebook_runs_and_is_committed_without_outputs(path):
    run_notebook(path)
