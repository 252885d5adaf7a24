"""flaxdiff: DDPM-family diffusion models in JAX/Flax NNX, number-for-number compatible with diffusers.

The public names are imported on first use, so `import flaxdiff` (and the CLIs' `--help`) does not
load JAX; the XLA flags below are set before anything can.
"""

import importlib

import sys

from . import _xla_flags  # noqa: F401  (must run before JAX initialises its backends)
from .backend import installed as _installed

if "jax" in sys.modules and getattr(sys.modules["jax"], "__version__", None) not in (None, _installed("jax")):
    raise ImportError(f"this Python process imported jax {sys.modules['jax'].__version__}, but jax "
                      f"{_installed('jax')} is installed now (installed after the import): restart the runtime "
                      "(Colab/Kaggle: Runtime > Restart session) and run again")

__version__ = "0.1.0"

_EXPORTS = {
    "UNet2D": "unet", "UNet2DConfig": "unet",
    "NoiseSchedule": "schedule", "add_noise": "schedule", "get_velocity": "schedule", "to_x0_eps": "schedule",
    "training_target": "schedule",
    "DiffusionPipeline": "pipeline", "sample_program": "pipeline", "load_pipeline": "load",
    "DDIMSampler": "samplers", "DDPMSampler": "samplers", "DPMSolverMultistepSampler": "samplers", "Plan": "samplers",
    "make_sampler": "samplers", "sample_loop": "samplers",
    "bits_per_dim": "bound", "pipeline_bits_per_dim": "bound",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flaxdiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
