"""DDPM, DDIM and DPM-Solver++ sampling as one `jax.lax.scan`, in parity with diffusers.

* `base`: the `Plan` a sampler precomputes on the host and the typed plan -> step contract
  (`SamplerStep`, `StepOptions`), timestep spacing, clipping and thresholding.
* `ddpm`, `ddim`, `dpm_solver`: one sampler each (its settings, its plan, its step).
* `loop`: `sample_loop`, the whole reverse process as one `lax.scan`.

`make_sampler(name, scheduler_config)` builds a sampler from a diffusers scheduler config, as
`OtherScheduler.from_config(config)` does; names are registered in `flaxdiff.choices.SAMPLERS`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..choices import SAMPLER_NAMES, SAMPLERS, check_choice, sampler_class
from .base import Plan, SamplerBase, SamplerStep, StepOptions, check_num_inference_steps, ddpm_timesteps
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverMultistepSampler, dpm_timesteps
from .loop import sample_loop

__all__ = ["DDIMSampler", "DDPMSampler", "DPMSolverMultistepSampler", "Plan", "SamplerBase", "SamplerStep",
           "StepOptions", "check_num_inference_steps", "ddpm_timesteps", "dpm_timesteps", "make_sampler",
           "sample_loop", "sampler_name_for_config"]


def sampler_name_for_config(config: Mapping[str, Any]) -> str:
    """The registered sampler a diffusers scheduler config describes (its `_class_name`, and the
    settings a name implies, e.g. DPM-Solver's algorithm_type); DDPM when it names none we know."""
    class_name = config.get("_class_name")
    names = [name for name in SAMPLER_NAMES if sampler_class(name).diffusers_class == class_name]
    for name in names:
        settings = SAMPLERS[name][2]
        if settings and all(config.get(key) == value for key, value in settings.items()):
            return name
    return names[0] if names else "ddpm"


def make_sampler(sampler: str | None, config: Mapping[str, Any] | None = None) -> SamplerBase:
    """A sampler of the given name built from a diffusers scheduler config, as `X.from_config` does.

    sampler None: the one the config's `_class_name` names. The settings a name implies (e.g.
    "sde-dpmsolver++" -> algorithm_type) override the config's.
    """
    config = dict(config or {})
    name = sampler_name_for_config(config) if sampler is None else sampler
    check_choice("sampler", name, SAMPLER_NAMES)
    config.update(SAMPLERS[name][2])
    return sampler_class(name).from_config(config)
