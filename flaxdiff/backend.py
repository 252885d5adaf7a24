"""Which code paths a process takes: the TPU/GPU ones, or the CPU-only speed tricks.

flaxdiff has a few tricks that only help XLA:CPU: the layer rewrites of `flaxdiff/ops.py`, loops
unrolled instead of `lax.scan` (flaxdiff/training/step.py), YNNPACK through XLA_FLAGS
(`_xla_flags.py`), the glibc malloc restart (`host.py`), and one CPU device per core for sampling.
TPUs and GPUs take the plain paths. `FLAXDIFF_ACCELERATOR_PATHS=1` makes a CPU process take the
TPU/GPU paths too, so that CI runs every branch an accelerator runs.

`accelerator_expected()` answers before JAX starts (from the environment and the installed
packages); `accelerator_paths()` answers once JAX knows its backend.
"""

from __future__ import annotations

import importlib.metadata
import os

SWITCH = "FLAXDIFF_ACCELERATOR_PATHS"
# packages whose presence makes a TPU or GPU JAX's default backend
ACCELERATOR_PLUGINS = ("libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin",
                       "jax-rocm7-plugin")


def forced(environ=None) -> bool:
    """The switch: take the TPU/GPU paths on a CPU."""
    environ = os.environ if environ is None else environ
    return environ.get(SWITCH, "0") == "1"


def installed(distribution: str) -> str | None:
    """The installed version of a Python distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator_expected(environ=None) -> bool:
    """Before JAX starts: will this process run on a TPU/GPU (or take their paths by the switch)?
    JAX_PLATFORMS decides when set; else an installed TPU/GPU plugin does."""
    environ = os.environ if environ is None else environ
    if forced(environ):
        return True
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] != "cpu"
    return any(installed(name) for name in ACCELERATOR_PLUGINS)


def accelerator_paths() -> bool:
    """Take the TPU/GPU paths: on a TPU or GPU backend, or on a CPU with the switch on."""
    if forced():
        return True
    import jax

    return jax.default_backend() != "cpu"
