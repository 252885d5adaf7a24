"""The layering of docs/architecture.md, enforced: a module imports only lower layers (or its
package's siblings), and the modules `--help` needs load no JAX."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = Path(ROOT) / "flaxdiff"


def layers() -> dict[str, int]:
    """`flaxdiff/x.py` or `flaxdiff/pkg/` -> layer, from the table in docs/architecture.md."""
    page = (Path(ROOT) / "docs" / "architecture.md").read_text()
    return {path: int(layer) for path, layer in re.findall(r"^\| `(flaxdiff/[\w/.]+)` \| (\d+) \|", page, re.M)}


def room(path: Path, table: dict[str, int]) -> str:
    """The table entry a source file belongs to (itself, or its package's folder)."""
    relative = path.relative_to(ROOT).as_posix()
    if relative in table:
        return relative
    folder = relative.rsplit("/", 1)[0] + "/"
    assert folder in table, f"{relative} is in no row of docs/architecture.md's layer table"
    return folder


def source_file(module: str) -> Path | None:
    """flaxdiff.x.y -> its .py file or its package's __init__.py (None if not a flaxdiff module)."""
    target = Path(ROOT, *module.split("."))
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    return target / "__init__.py" if (target / "__init__.py").is_file() else None


def imported_files(path: Path) -> set[Path]:
    """The flaxdiff source files a file imports (absolute or relative imports, at any depth):
    `from X import name` imports the module X.name when there is one, else X itself."""
    package_parts = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {source_file(alias.name) for alias in node.names if alias.name.startswith("flaxdiff")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package_parts[:len(package_parts) - node.level + 1], *([base] if base else [])])
            if base.startswith("flaxdiff"):
                found |= {source_file(f"{base}.{alias.name}") or source_file(base) for alias in node.names}
    return found - {None}


def test_every_import_goes_down_a_layer():
    table = layers()
    assert len(table) > 15, "the layer table of docs/architecture.md was not found"
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = room(path, table)
        for target in imported_files(path):
            theirs = room(target, table)
            if theirs == mine and mine.endswith("/"):
                continue  # siblings inside a package
            if table[theirs] >= table[mine]:
                wrong.append(f"{path.relative_to(ROOT)} (layer {table[mine]}) imports "
                             f"{target.relative_to(ROOT)} (layer {table[theirs]})")
    assert not wrong, "imports that do not go down a layer:\n" + "\n".join(wrong)


def test_help_and_option_checks_load_no_jax():
    code = ("import sys, flaxdiff, flaxdiff.choices, flaxdiff.images, flaxdiff.cli, flaxdiff.hub, flaxdiff.host, "
            "flaxdiff.training.options; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out


def test_every_training_module_has_a_row():
    """The training package's table in docs/architecture.md names each of its modules."""
    page = (Path(ROOT) / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"^\| `(\w+\.py)` \|", page, re.M))
    modules = {p.name for p in (PACKAGE / "training").glob("*.py") if p.name != "__init__.py"}
    assert modules <= named, f"no row in docs/architecture.md for {sorted(modules - named)}"
