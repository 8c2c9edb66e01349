"""The notebooks run top to bottom on CPU."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb", "sweep.ipynb", "dynamic_gate.ipynb"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("DYNAMIC_GATE_QUICK", "1")  # one type, 2 chunks: the full sweeps take an hour per model
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
