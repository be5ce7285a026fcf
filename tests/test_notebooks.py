"""Every notebook runs top to bottom, headless, in a fresh kernel.

results.ipynb reads the committed fixture runs under tests/fixtures/results/:
the main job's metrics and samples (pretrain + grpo), a two-arm sweep, and a
two-arm sweep with two seeds per arm (`sweep --smoke --seeds=2`).
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.experiment_loader import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "results")
NOTEBOOKS = ("model_tour", "grpo_walkthrough", "results")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("R1JAX_HEADLESS", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("R1JAX_RESULTS", ",".join(
      os.path.join(FIXTURES, run) for run in ("r1_zero_tiny", "kl_beta", "kl_beta_seeds")))
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
  nb = nbformat.read(path, as_version=4)
  # The committed notebooks carry no outputs, so a diff shows code, not pictures.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={
      "metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  if name == "results":
    assert "r1_zero_tiny" in text and "kl_beta/b0" in text and "before:" in text
    assert "kl_beta_seeds/b0: 2 seeds" in text and "kl_beta_seeds/b0/seed1" in text
