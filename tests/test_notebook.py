"""The notebook a student opens instead of the session's runs top to bottom (quick settings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "practical_session.ipynb"
pytestmark = pytest.mark.slow


def test_notebook_executes_on_quick_settings(real_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_QUICK", "1")
    monkeypatch.setenv("CIFAR4_DATA", str(real_path))
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))  # the transfer features
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "16800 train / 3600 val / 3600 test" in outputs
    assert "Total params: 61,544" in outputs and "Total params: 28,612" in outputs
    assert "full report:" in outputs
    assert "transfer-random" in outputs and "(miss)" in outputs
    assert os.path.exists(tmp_path / "samples.png")
