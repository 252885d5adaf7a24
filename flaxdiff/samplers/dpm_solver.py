"""Multistep DPM-Solver++ (Lu et al. 2022b), diffusers' `DPMSolverMultistepScheduler` with
algorithm_type dpmsolver++ or sde-dpmsolver++.

Where diffusers is mathematically wrong we do what is right: learned-variance models with other
than 3 channels (diffusers keeps the first 3 channels of the output).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..choices import TIMESTEP_SPACINGS, VARIANCE_TYPES, check_choice
from ..schedule import split_prediction
from .base import (Plan, SamplerBase, SamplerStep, StepOptions, check_in_range, check_num_inference_steps, f32,
                   make_plan, split_learned_variance, threshold_options, threshold_sample)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPMSolverStep(SamplerStep):
    """Every scalar of a step, from the plan; unused terms have zero coefficients, so one traced
    body covers the warm-up, multistep and lower-order-final steps alike."""

    alpha_s0: jax.Array  # alpha_t and sigma_t of the VP process at the step's start
    sigma_s0: jax.Array
    sample_coeff: jax.Array
    d0_coeff: jax.Array
    d1_coeff: jax.Array
    d2_coeff: jax.Array
    noise_coeff: jax.Array  # SDE variant only
    inv_r0: jax.Array
    inv_r1: jax.Array
    r0_over_r0r1: jax.Array
    inv_r0r1: jax.Array

    @classmethod
    def init_history(cls, latents):
        """The data predictions of the two previous steps."""
        return (jnp.zeros_like(latents), jnp.zeros_like(latents))

    def apply(self, options: StepOptions, sample, history, model_output, noise):
        """One multistep DPM-Solver++ update (Lu et al. 2022b, Alg. 2; order 1-3, midpoint or Heun)."""
        model_output, _ = split_learned_variance(model_output, sample, options)
        # DPM-Solver++ works on data predictions
        x0, _ = split_prediction(model_output, sample, self.alpha_s0, self.sigma_s0, options.prediction_type)
        if options.thresholding:
            x0 = threshold_sample(x0, options.dynamic_thresholding_ratio, options.sample_max_value)
        m0, (m1, m2) = x0, history
        # divided differences D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
        d1_0 = self.inv_r0 * (m0 - m1)
        d1_1 = self.inv_r1 * (m1 - m2)
        d1 = d1_0 + self.r0_over_r0r1 * (d1_0 - d1_1)
        d2 = self.inv_r0r1 * (d1_0 - d1_1)
        prev = self.sample_coeff * sample + self.d0_coeff * m0 + self.d1_coeff * d1 + self.d2_coeff * d2
        if options.stochastic:
            prev = prev + self.noise_coeff * noise
        return prev, (m0, m1), x0


def dpm_timesteps(num_train_timesteps: int, last_timestep: int, n: int, spacing: str,
                  steps_offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps: n + 1 points with the last (t = 0) dropped."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    ratio = num_train_timesteps / n
    return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepSampler(SamplerBase):
    """diffusers `DPMSolverMultistepScheduler` with algorithm_type dpmsolver++ or sde-dpmsolver++."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_lu_lambdas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None

    kind: ClassVar[str] = "dpmsolver++"
    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    _restricted: ClassVar[dict] = {
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "use_beta_sigmas": (False, None),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False, None),
    }

    def __post_init__(self):
        super().__post_init__()
        check_choice("algorithm_type", self.algorithm_type, self._restricted["algorithm_type"])
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.variance_type is not None:
            check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if sum([self.use_karras_sigmas, self.use_exponential_sigmas, self.use_lu_lambdas]) > 1:
            raise ValueError("use at most one of use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas")

    def _sigmas_and_timesteps(self, n: int):
        """Timesteps (int) and sigmas = sqrt((1 - a) / a) of each step plus the final one (float32)."""
        ac = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ac[-1] = 2.0**-24  # diffusers: keeps the last sigma finite
        T = self.num_train_timesteps
        all_sigmas = ((f32(1) - ac) / ac) ** f32(0.5)
        with np.errstate(divide="ignore"):
            lambdas = np.log(ac**f32(0.5)) - np.log((f32(1) - ac) ** f32(0.5))
        clipped = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped, side="left"))
        timesteps = check_in_range(dpm_timesteps(T, T - clipped, n, self.timestep_spacing,
                                                  self.steps_offset), self)
        log_sigmas = np.log(all_sigmas)
        if self.use_karras_sigmas or self.use_exponential_sigmas or self.use_lu_lambdas:
            flipped = all_sigmas[::-1].copy()
            sigma_min, sigma_max = float(flipped[-1]), float(flipped[0])
            ramp = np.linspace(0, 1, n)
            if self.use_karras_sigmas:  # Karras et al. 2022, eq. 5 with rho = 7
                rho = 7.0
                sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            elif self.use_exponential_sigmas:
                sigmas = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
            else:  # uniform in log-SNR (Lu et al. 2022b)
                lambdas_flipped = log_sigmas[::-1].copy()
                lam = lambdas_flipped[0] + ramp * (lambdas_flipped[-1] - lambdas_flipped[0])
                sigmas = np.exp(lam)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.beta_schedule != "squaredcos_cap_v2" and not self.use_exponential_sigmas:
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
        if self.final_sigmas_type == "sigma_min":
            sigma_last = ((f32(1) - ac[0]) / ac[0]) ** f32(0.5)
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return timesteps.astype(np.int64), sigmas

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        return self._sigmas_and_timesteps(n)[0]

    def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
        del eta  # stochasticity is the algorithm_type (sde-dpmsolver++)
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        timesteps, sigmas = self._sigmas_and_timesteps(n)
        steps = len(timesteps)
        # alpha_t, sigma_t of the VP process from sigma = sigma_t / alpha_t
        alpha = f32(1) / ((sigmas**2 + f32(1)) ** f32(0.5))
        sigma = sigmas * alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # half log-SNR; +inf at a zero final sigma
            orders = []
            for i in range(steps):
                last = i == steps - 1
                lower_final = last and (self.euler_at_final or (self.lower_order_final and steps < 15)
                                        or self.final_sigmas_type == "zero")
                lower_second = i == steps - 2 and self.lower_order_final and steps < 15
                if self.solver_order == 1 or i < 1 or lower_final:
                    orders.append(1)
                elif self.solver_order == 2 or i < 2 or lower_second:
                    orders.append(2)
                else:
                    orders.append(3)
            zeros = np.zeros(steps, np.float32)
            c = {name: zeros.copy() for name in ("inv_r0", "inv_r1", "r0_over_r0r1", "inv_r0r1",
                                                 "d1_coeff", "d2_coeff", "noise_coeff")}
            c["sample_coeff"], c["d0_coeff"] = zeros.copy(), zeros.copy()
            sde = self.algorithm_type == "sde-dpmsolver++"
            for i, order in enumerate(orders):
                alpha_t, sigma_t, sigma_s0 = alpha[i + 1], sigma[i + 1], sigma[i]
                h = lam[i + 1] - lam[i]
                if sde:
                    # SDE-DPM-Solver++ (Lu et al. 2022b, appendix): exp(-h) decay plus fresh noise
                    c["sample_coeff"][i] = sigma_t / sigma_s0 * np.exp(-h)
                    phi = alpha_t * (f32(1) - np.exp(f32(-2.0) * h))
                    c["d0_coeff"][i] = phi
                    c["noise_coeff"][i] = sigma_t * np.sqrt(f32(1) - np.exp(-2 * h))
                else:
                    c["sample_coeff"][i] = sigma_t / sigma_s0
                    phi = -(alpha_t * (np.exp(-h) - f32(1)))  # alpha_t (1 - e^{-h})
                    c["d0_coeff"][i] = phi
                if order >= 2:
                    h_0 = lam[i] - lam[i - 1]
                    r0 = h_0 / h
                    c["inv_r0"][i] = f32(1) / r0
                    if self.solver_type == "midpoint" and order == 2:
                        c["d1_coeff"][i] = f32(0.5) * phi
                    elif sde:  # Heun, and the third-order formula
                        c["d1_coeff"][i] = alpha_t * ((f32(1) - np.exp(f32(-2.0) * h)) / (f32(-2.0) * h) + f32(1))
                    else:
                        c["d1_coeff"][i] = alpha_t * ((np.exp(-h) - f32(1)) / h + f32(1))
                if order == 3:
                    h_1 = lam[i - 1] - lam[i - 2]
                    r1 = h_1 / h
                    c["inv_r1"][i] = f32(1) / r1
                    c["r0_over_r0r1"][i] = r0 / (r0 + r1)
                    c["inv_r0r1"][i] = f32(1) / (r0 + r1)
                    if sde:
                        e2h = np.exp(f32(-2.0) * h)
                        c["d2_coeff"][i] = alpha_t * ((f32(1) - e2h - f32(2.0) * h) / (f32(2.0) * h) ** 2 - f32(0.5))
                    else:
                        c["d2_coeff"][i] = -(alpha_t * ((np.exp(-h) - f32(1) + h) / h**2 - f32(0.5)))
        c["alpha_s0"], c["sigma_s0"] = alpha[:steps], sigma[:steps]
        options = StepOptions(kind=self.algorithm_type, prediction_type=self.prediction_type,
                              variance_type=self.variance_type, stochastic=sde, **threshold_options(self))
        return make_plan(timesteps, DPMSolverStep, c, options)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep with this sigma (interpolated in log sigma), as diffusers."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return float(((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma)))


