"""The notebooks run top to bottom (QUICK size) and are what their sources build, without outputs."""

import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = Path(ROOT) / "notebooks"
MNIST = Path(ROOT).parent / "shared" / "data" / "mnist_t10k.npz"


def test_notebooks_are_built_from_their_sources_and_have_no_outputs():
    result = subprocess.run([sys.executable, str(NOTEBOOKS / "build.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for path in NOTEBOOKS.glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            assert not cell.get("outputs") and not cell.get("execution_count"), path.name


@pytest.mark.parametrize("name", ["01_introduction_to_flaxdiff.ipynb", "02_diffusion_models_from_scratch.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if MNIST.is_file():
        monkeypatch.setenv("MNIST_NPZ", str(MNIST))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"\n{name}: executed in {time.perf_counter() - start:.0f}s")
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "Traceback" not in text
    if name.startswith("01"):
        assert "the same seed gives the same images: True" in text
        assert (tmp_path / "my-flaxdiff-pipeline" / "model_index.json").is_file()
    else:
        assert (tmp_path / "from_scratch_results.png").is_file()
