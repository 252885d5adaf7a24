"""DDIM (Song et al. 2021), diffusers' `DDIMScheduler`, with `eta` and `use_clipped_model_output`.

diffusers steps to `t - T // n`, right only when the timesteps are evenly spaced by T // n (always
for "leading" spacing); with "linspace", or "trailing" when n does not divide T, the step must land
on the next timestep of the list, which is what we do.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from ..schedule import split_prediction
from .base import (Plan, SamplerBase, SamplerStep, StepOptions, clip_or_threshold, f32, make_plan, prev_timesteps,
                   split_learned_variance, threshold_options)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMStep(SamplerStep):
    sqrt_alpha_prod: jax.Array
    sqrt_beta_prod: jax.Array
    sqrt_alpha_prod_prev: jax.Array
    direction_coeff: jax.Array  # sqrt(1 - alpha_prev - sigma^2): "direction pointing to x_t", eq. 12
    std: jax.Array  # sigma_t of eq. 16, eta included

    def apply(self, options: StepOptions, sample, history, model_output, noise):
        """One DDIM step (Song et al. 2021, eq. 12)."""
        model_output, _ = split_learned_variance(model_output, sample, options)
        sqrt_alpha, sqrt_beta = self.sqrt_alpha_prod, self.sqrt_beta_prod
        x0, eps = split_prediction(model_output, sample, sqrt_alpha, sqrt_beta, options.prediction_type)
        x0 = clip_or_threshold(x0, options)
        if options.use_clipped_model_output:
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        prev = self.sqrt_alpha_prod_prev * x0 + self.direction_coeff * eps
        if options.stochastic:
            prev = prev + self.std * noise
        return prev, history, x0


@dataclasses.dataclass(frozen=True)
class DDIMSampler(SamplerBase):
    """diffusers `DDIMScheduler` (Song et al. 2021); `eta` and `use_clipped_model_output` per call."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    kind: ClassVar[str] = "ddim"
    diffusers_class: ClassVar[str] = "DDIMScheduler"

    def plan(self, num_inference_steps: int, eta: float = 0.0, use_clipped_model_output: bool = False) -> Plan:
        eta = float(eta)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
        timesteps = self.timesteps(num_inference_steps)
        previous = prev_timesteps(timesteps)
        ac = self.alphas_cumprod
        final_alpha = f32(1) if self.set_alpha_to_one else ac[0]
        alpha_prod = ac[timesteps]
        alpha_prod_prev = np.where(previous >= 0, ac[np.maximum(previous, 0)], final_alpha)
        beta_prod = f32(1) - alpha_prod
        beta_prod_prev = f32(1) - alpha_prod_prev
        variance = (beta_prod_prev / beta_prod) * (f32(1) - alpha_prod / alpha_prod_prev)  # sigma_t^2 at eta = 1
        std = f32(eta) * variance**f32(0.5)
        coeffs = dict(sqrt_alpha_prod=alpha_prod**f32(0.5), sqrt_beta_prod=beta_prod**f32(0.5),
                      sqrt_alpha_prod_prev=alpha_prod_prev**f32(0.5),
                      direction_coeff=(f32(1) - alpha_prod_prev - std**2) ** f32(0.5), std=std)
        options = StepOptions(kind="ddim", prediction_type=self.prediction_type, clip_sample=bool(self.clip_sample),
                              clip_sample_range=float(self.clip_sample_range),
                              use_clipped_model_output=bool(use_clipped_model_output), stochastic=eta > 0,
                              **threshold_options(self))
        return make_plan(timesteps, DDIMStep, coeffs, options)
