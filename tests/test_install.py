"""The documented install on a copy of a TPU runtime's JAX: scripts/install-keep-jax.sh keeps jax,
jaxlib and libtpu as they are, where a plain `pip install` would move jax off its plugin.

It builds a virtualenv with Kaggle's TPU JAX (jax 0.6.2, libtpu 0.0.17) and asks pip to resolve
both installs (--dry-run): it needs PyPI, so it runs where FLAXDIFF_TEST_INSTALL=1 (.ci/run sets it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

RUNTIME = {"jax": "0.6.2", "jaxlib": "0.6.2", "libtpu": "0.0.17"}  # Kaggle's TPU image
pytestmark = pytest.mark.skipif(os.environ.get("FLAXDIFF_TEST_INSTALL") != "1",
                                reason="needs PyPI and a fresh virtualenv: set FLAXDIFF_TEST_INSTALL=1")


def resolved(report: Path) -> dict[str, str]:
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_documented_install_keeps_the_runtimes_jax(tmp_path):
    venv = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", *(f"{k}=={v}" for k, v in RUNTIME.items())], check=True)
    plain = tmp_path / "plain.json"
    subprocess.run([python, "-m", "pip", "install", "-q", "--dry-run", "--report", str(plain), "-e", ROOT],
                   check=True)
    assert resolved(plain).get("jax", RUNTIME["jax"]) != RUNTIME["jax"]  # the breakage the script prevents
    kept = tmp_path / "kept.json"
    subprocess.run(["bash", str(Path(ROOT) / "scripts" / "install-keep-jax.sh"), "-q", "--dry-run", "--report",
                    str(kept)], check=True, env={**os.environ, "PYTHON": python})
    installs = resolved(kept)
    print(f"\nwith the runtime's {RUNTIME}, the documented install resolves flax {installs.get('flax')}, "
          f"optax {installs.get('optax')}, orbax-checkpoint {installs.get('orbax-checkpoint')}")
    assert not set(installs) & set(RUNTIME), installs
    assert installs["flax"].startswith("0.11.")
