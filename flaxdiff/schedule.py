"""Noise schedules: the forward process q(x_t | x_0) of DDPM, built like diffusers builds it.

`NoiseSchedule` is an immutable pytree of float32 arrays (betas, alphas, alphas_cumprod) built
from a diffusers scheduler config. The arrays are bitwise equal to the ones diffusers computes
in PyTorch: `torch.linspace` is reproduced exactly (it rounds `start + step * i` once, i.e. a
fused multiply-add, and counts the upper half from `end`), and `torch.cumprod` accumulates in
float64 before rounding to float32, which is what we do too.

The pure functions below (`add_noise`, `get_velocity`, prediction-type conversions) take either a
schedule and integer timesteps, or the cumulative alpha directly, so samplers and the training
loss share one definition of each formula.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .choices import BETA_SCHEDULES, PREDICTION_TYPES, check_choice

# Keys of a diffusers scheduler config that determine the betas, with diffusers' defaults.
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)`, bit for bit.

    PyTorch's CPU kernel computes `step = (end - start) / (steps - 1)` in float32, then
    `start + step * i` for the lower half and `end - step * (steps - 1 - i)` for the upper half,
    each rounded once (a fused multiply-add). float64 holds `step * i` exactly, so evaluating in
    float64 and rounding to float32 reproduces it.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lower = (np.float64(start32) + step * i).astype(np.float32)
    upper = (np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, lower, upper).astype(np.float32)


def _betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t) on [0, 1] into betas (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1).

    Evaluated in float32 with the same operation order as diffusers.
    """
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_bar_sqrt = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               beta_schedule: str = "linear", trained_betas=None,
               rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """The float32 betas a diffusers scheduler with these settings holds."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("trained_betas must be a non-empty 1-D list of floats")
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        n = int(num_train_timesteps)
        if n < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
        if beta_schedule == "linear":
            betas = torch_linspace_f32(beta_start, beta_end, n)
        elif beta_schedule == "scaled_linear":  # the latent-diffusion schedule
            betas = torch_linspace_f32(beta_start**0.5, beta_end**0.5, n) ** 2
        elif beta_schedule == "squaredcos_cap_v2":  # Glide cosine schedule
            betas = _betas_for_alpha_bar(n, _cosine_alpha_bar)
        elif beta_schedule == "laplace":
            betas = _betas_for_alpha_bar(n, _laplace_alpha_bar)
        else:  # sigmoid (GeoDiff)
            x = torch_linspace_f32(-6, 6, n)
            sigmoid = np.float32(1) / (np.float32(1) + np.exp(-x))
            betas = sigmoid * np.float32(beta_end - beta_start) + np.float32(beta_start)
    betas = betas.astype(np.float32)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def schedule_kwargs(config: Mapping[str, Any] | None = None, **overrides) -> dict[str, Any]:
    """The beta-defining entries of a diffusers scheduler config, defaults filled in."""
    merged = {**(dict(config) if config else {}), **overrides}
    return {key: merged.get(key, default) for key, default in SCHEDULE_DEFAULTS.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process: beta_t, alpha_t = 1 - beta_t, alphas_cumprod_t = prod alpha."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (other keys are ignored) and/or keywords."""
        betas = make_betas(**schedule_kwargs(config, **overrides))
        alphas = (np.float32(1.0) - betas).astype(np.float32)
        # torch.cumprod accumulates float32 inputs in float64; so do we.
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        return cls(jnp.asarray(betas), jnp.asarray(alphas), jnp.asarray(alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def _expand(values: jax.Array, ndim: int) -> jax.Array:
    """Per-example values (B,) -> (B, 1, ..., 1) to broadcast against NHWC arrays."""
    values = jnp.reshape(values, (-1,))
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _alpha_prod(schedule: NoiseSchedule, timesteps: jax.Array, like: jax.Array) -> jax.Array:
    return _expand(schedule.alphas_cumprod.astype(like.dtype)[timesteps], like.ndim)


def add_noise(schedule: NoiseSchedule, original_samples: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
    """x_t = sqrt(alphas_cumprod_t) x_0 + sqrt(1 - alphas_cumprod_t) eps (Ho et al. 2020, eq. 4)."""
    alpha_prod = _alpha_prod(schedule, timesteps, original_samples)
    return alpha_prod**0.5 * original_samples + (1 - alpha_prod) ** 0.5 * noise


def get_velocity(schedule: NoiseSchedule, sample: jax.Array, noise: jax.Array,
                 timesteps: jax.Array) -> jax.Array:
    """v = sqrt(alphas_cumprod_t) eps - sqrt(1 - alphas_cumprod_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    return training_target(schedule, sample, noise, timesteps, "v_prediction")


def split_prediction(model_output, sample, sqrt_alpha_prod, sqrt_beta_prod, prediction_type: str):
    """(x_0, eps) implied by a model output at x_t = `sample`, in diffusers' operation order.

    sqrt_alpha_prod = sqrt(alphas_cumprod_t), sqrt_beta_prod = sqrt(1 - alphas_cumprod_t): scalars or
    arrays that broadcast against `sample` (samplers pass them precomputed per step).
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_beta_prod * model_output) / sqrt_alpha_prod
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_alpha_prod * model_output) / sqrt_beta_prod
    else:  # v_prediction (Salimans & Ho 2022, sec. 4)
        x0 = sqrt_alpha_prod * sample - sqrt_beta_prod * model_output
        eps = sqrt_alpha_prod * model_output + sqrt_beta_prod * sample
    return x0, eps


def x0_eps_from_output(model_output: jax.Array, sample: jax.Array, alpha_prod: jax.Array,
                       prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """`split_prediction` with alphas_cumprod_t given (a scalar or broadcastable to `sample`)."""
    return split_prediction(model_output, sample, alpha_prod**0.5, (1 - alpha_prod) ** 0.5, prediction_type)


def output_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha_prod: jax.Array,
                       prediction_type: str) -> jax.Array:
    """The model output of a prediction type that corresponds to (x_0, eps): the training target."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha_prod**0.5 * eps - (1 - alpha_prod) ** 0.5 * x0


def to_x0_eps(schedule: NoiseSchedule, model_output: jax.Array, sample: jax.Array,
              timesteps: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """`x0_eps_from_output` with alphas_cumprod looked up per example from integer timesteps."""
    return x0_eps_from_output(model_output, sample, _alpha_prod(schedule, timesteps, sample),
                              prediction_type)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
                    prediction_type: str) -> jax.Array:
    """What a model of this prediction type should output for x_t built from (x0, noise)."""
    return output_from_x0_eps(x0, noise, _alpha_prod(schedule, timesteps, x0), prediction_type)


def signal_to_noise(schedule: NoiseSchedule, timesteps: jax.Array, like: jax.Array) -> jax.Array:
    """SNR_t = alphas_cumprod_t / (1 - alphas_cumprod_t), per example, broadcastable to `like`."""
    alpha_prod = _alpha_prod(schedule, timesteps, like)
    return alpha_prod / (1 - alpha_prod)


def posterior(alpha_prod, alpha_prod_prev):
    """q(x_prev | x_t, x_0) = N(x0_coeff x_0 + sample_coeff x_t, variance) (Ho et al. 2020, eqs. 6-7).

    From alphas_cumprod at t and at the step's target (1 after the last step); numpy or JAX arrays,
    evaluated in their dtype in diffusers' DDPMScheduler operation order. Returns
    (x0_coeff, sample_coeff, variance, beta_t) with beta_t = 1 - alpha_prod / alpha_prod_prev.
    """
    scalar = np.dtype(getattr(alpha_prod, "dtype", np.float64)).type  # keeps float32 in float32
    one, half = scalar(1), scalar(0.5)
    beta_prod, beta_prod_prev = one - alpha_prod, one - alpha_prod_prev
    current_alpha = alpha_prod / alpha_prod_prev
    current_beta = one - current_alpha
    x0_coeff = (alpha_prod_prev**half * current_beta) / beta_prod
    sample_coeff = current_alpha**half * beta_prod_prev / beta_prod
    variance = beta_prod_prev / beta_prod * current_beta
    return x0_coeff, sample_coeff, variance, current_beta
