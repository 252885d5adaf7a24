"""Print pip constraints that pin every dependency of flaxdiff at its declared lower bound.

    python .ci/floors.py > floors.txt && pip install -c floors.txt -e '.[test]'

From pyproject.toml's `>=` bounds (core dependencies and the test extra's diffusers), plus
jaxlib at jax's floor, so the floors are defined once, in pyproject.toml.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
pins = {}
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9][0-9.]*)", requirement.replace(" ", ""))
    if match and (requirement in project["dependencies"] or match.group(1) == "diffusers"):
        pins[match.group(1)] = match.group(3)
if "jax" not in pins:
    sys.exit("pyproject.toml declares no jax floor")
pins["jaxlib"] = pins["jax"]
print("\n".join(f"{name}=={version}" for name, version in pins.items()))
