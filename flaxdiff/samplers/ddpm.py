"""DDPM ancestral sampling (Ho et al. 2020), diffusers' `DDPMScheduler`.

Where diffusers is mathematically wrong we do what is right and say so at the spot:
`fixed_large_log` (diffusers takes the square root of a log-variance).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..choices import VARIANCE_TYPES, check_choice
from ..schedule import posterior, split_prediction
from .base import (Plan, SamplerBase, SamplerStep, StepOptions, clip_or_threshold, f32, make_plan, prev_timesteps,
                   split_learned_variance, threshold_options)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDPMStep(SamplerStep):
    sqrt_alpha_prod: jax.Array
    sqrt_beta_prod: jax.Array
    x0_coeff: jax.Array  # posterior mean coefficients, Ho et al. 2020 eq. 7
    sample_coeff: jax.Array
    add_noise: jax.Array  # 1.0 where t > 0 (diffusers adds no noise at the last step)
    min_log: jax.Array  # log posterior variance, for learned_range
    max_log: jax.Array  # log beta_t, for learned_range
    std: jax.Array  # the fixed standard deviation of each step

    def apply(self, options: StepOptions, sample, history, model_output, noise):
        """One ancestral step x_t -> x_prev (Ho et al. 2020, eqs. 6-7)."""
        model_output, predicted_variance = split_learned_variance(model_output, sample, options)
        x0, _ = split_prediction(model_output, sample, self.sqrt_alpha_prod, self.sqrt_beta_prod,
                                 options.prediction_type)
        x0 = clip_or_threshold(x0, options)
        prev = self.x0_coeff * x0 + self.sample_coeff * sample  # the posterior mean, eq. 7
        if options.variance_type == "learned":
            std = predicted_variance**0.5
        elif options.variance_type == "learned_range":
            # Improved DDPM (Nichol & Dhariwal 2021, eq. 15): interpolate the log-variance
            frac = (predicted_variance + 1) / 2
            std = jnp.exp(0.5 * (frac * self.max_log + (1 - frac) * self.min_log))
        else:
            std = self.std
        return prev + self.add_noise * (std * noise), history, x0


@dataclasses.dataclass(frozen=True)
class DDPMSampler(SamplerBase):
    """diffusers `DDPMScheduler` (ancestral sampling, Ho et al. 2020)."""

    variance_type: str | None = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    kind: ClassVar[str] = "ddpm"
    diffusers_class: ClassVar[str] = "DDPMScheduler"

    def __post_init__(self):
        super().__post_init__()
        if self.variance_type is None:  # a DPM-Solver config converted here; diffusers' DDPM
            object.__setattr__(self, "variance_type", "fixed_small")  # then acts as fixed_small
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)

    def default_num_inference_steps(self) -> int:
        return min(1000, self.num_train_timesteps)  # DDPMPipeline's default

    def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
        del eta  # DDPM is always fully stochastic
        timesteps = self.timesteps(num_inference_steps)
        previous = prev_timesteps(timesteps)
        ac = self.alphas_cumprod
        alpha_prod = ac[timesteps]
        alpha_prod_prev = np.where(previous >= 0, ac[np.maximum(previous, 0)], f32(1))
        with np.errstate(divide="ignore"):
            x0_coeff, sample_coeff, variance, current_beta = posterior(alpha_prod, alpha_prod_prev)
            variance = np.maximum(variance, f32(1e-20))  # diffusers' clamp, so its log is finite
            min_log, max_log = np.log(variance), np.log(current_beta)
        vt = self.variance_type
        if vt == "fixed_small":
            std = variance**f32(0.5)
        elif vt == "fixed_small_log":
            std = np.exp(f32(0.5) * min_log)
        elif vt == "fixed_large":
            std = current_beta**f32(0.5)
        elif vt == "fixed_large_log":
            # diffusers: `_get_variance` returns log(beta_t) and `step` takes its square root, which
            # is NaN for every beta_t < 1. The log form means std = exp(0.5 * log beta_t).
            std = np.exp(f32(0.5) * max_log)
        else:
            std = np.zeros_like(variance)  # from the model's output (learned variance)
        coeffs = dict(sqrt_alpha_prod=alpha_prod**f32(0.5), sqrt_beta_prod=(f32(1) - alpha_prod)**f32(0.5),
                      x0_coeff=x0_coeff, sample_coeff=sample_coeff, add_noise=(timesteps > 0).astype(np.float32),
                      min_log=min_log, max_log=max_log, std=std)
        options = StepOptions(kind="ddpm", prediction_type=self.prediction_type, clip_sample=bool(self.clip_sample),
                              clip_sample_range=float(self.clip_sample_range), variance_type=vt, stochastic=True,
                              **threshold_options(self))
        return make_plan(timesteps, DDPMStep, coeffs, options)
