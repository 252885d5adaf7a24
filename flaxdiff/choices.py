"""Every list of choices flaxdiff offers, in one place, and the one check that enforces them.

No JAX here: the command-line tools build `--help` from these lists without loading JAX. The
names are diffusers' wherever diffusers has one.

Adding a sampler: write its module under `flaxdiff/samplers/` and add one line to `SAMPLERS`.
"""

from __future__ import annotations

import importlib
from typing import Any

# ---------------------------------------------------------------- the noise schedule (diffusers' names)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# ---------------------------------------------------------------- samplers: name -> (module, class, settings)
# The one registry of samplers. `settings` are scheduler-config entries the name implies.
SAMPLERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddpm": ("flaxdiff.samplers.ddpm", "DDPMSampler", {}),
    "ddim": ("flaxdiff.samplers.ddim", "DDIMSampler", {}),
    "dpmsolver++": ("flaxdiff.samplers.dpm_solver", "DPMSolverMultistepSampler", {"algorithm_type": "dpmsolver++"}),
    "sde-dpmsolver++": ("flaxdiff.samplers.dpm_solver", "DPMSolverMultistepSampler",
                        {"algorithm_type": "sde-dpmsolver++"}),
}
SAMPLER_NAMES = tuple(SAMPLERS)

# ---------------------------------------------------------------- training (diffusers' train_unconditional names)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "bf16")
DATASET_ON_DEVICE = ("auto", "yes", "no")
LOGGERS = ("tensorboard", "wandb", "none")
ON_BAD_IMAGE = ("error", "skip")


def check_choice(name: str, value: Any, allowed) -> None:
    """Raise one ValueError naming the option, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, allowed))}")


def sampler_class(name: str):
    """The sampler class registered under `name` (imports its module, and so JAX)."""
    check_choice("sampler", name, SAMPLER_NAMES)
    module, cls, _ = SAMPLERS[name]
    return getattr(importlib.import_module(module), cls)
