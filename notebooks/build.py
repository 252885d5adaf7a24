"""Build the notebooks from their sources, so they stay reviewable as plain Python:

    python notebooks/build.py           # writes notebooks/*.ipynb (no outputs)
    python notebooks/build.py --check   # fails if an .ipynb is not what its source builds

Sources use `# %%` code cells and `# %% [markdown]` cells (the jupytext "percent" format).
Every notebook gets an install cell first, for Colab and Kaggle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
NOTEBOOKS = {
    "01_introduction_to_flaxdiff.ipynb": HERE / "src" / "01_introduction_to_flaxdiff.py",
    "02_diffusion_models_from_scratch.ipynb": HERE.parent / "examples" / "from_scratch.py",
}
INSTALL = '''# On Colab or Kaggle: install flaxdiff, keeping the runtime's own jax, jaxlib and TPU/GPU plugin, which
# match each other (upgrading jax alone would lose the accelerator). Skipped where flaxdiff is installed.
# For the full recipe pick a TPU runtime (Colab: Runtime > Change runtime type > TPU; Kaggle: Accelerator > TPU).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("flaxdiff") is None:
    if not os.path.isdir("flaxdiff"):
        subprocess.check_call(["git", "clone", "-q", "https://github.com/flaxdiff/flaxdiff"])
    subprocess.check_call(["bash", "flaxdiff/scripts/install-keep-jax.sh", "-q"])
    sys.path.insert(0, os.path.abspath("flaxdiff"))  # this kernel sees the new package without a restart'''


def cells_of(source: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell("\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                                                                 for l in text.splitlines())))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(source: Path) -> nbformat.NotebookNode:
    cells = cells_of(source.read_text())
    notebook = nbformat.v4.new_notebook(cells=cells[:1] + [nbformat.v4.new_code_cell(INSTALL)] + cells[1:])
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}, "accelerator": "TPU"}
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index}"
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for name, source in NOTEBOOKS.items():
        text = nbformat.writes(build(source)) + "\n"
        target = HERE / name
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(name)
        else:
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
