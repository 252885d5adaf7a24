"""DDPM, DDIM and DPM-Solver++ sampling as one `jax.lax.scan`, in parity with diffusers.

How it is split:

* A sampler (`DDPMSampler`, `DDIMSampler`, `DPMSolverMultistepSampler`) is a frozen dataclass of
  the diffusers scheduler settings. `sampler.plan(num_inference_steps, eta)` does all the
  per-step scalar arithmetic on the host, in float32 and in diffusers' operation order, and
  returns a `Plan`: arrays of shape (steps,) (timesteps and step coefficients) plus a small static
  `StepConfig` (the options that change the traced program: prediction type, clipping, ...).
* `sample_loop(model_fn, plan, latents, noise=None, key=None)` is the whole reverse process: a
  single `lax.scan` whose body calls the model and applies `step`. Only the array shapes and the
  `StepConfig` shape the compiled program, so it compiles once per (batch shape, step count) and
  its compile time does not depend on the number of steps.

Where diffusers is mathematically wrong we do what is right and say so at the spot:
DDPM `fixed_large_log` (diffusers takes the square root of a log-variance), DDIM's previous
timestep (diffusers uses a fixed stride `T // n`, wrong for `linspace`/`trailing` spacing when
the stride is not constant), and learned-variance models with other than 3 channels in
DPM-Solver (diffusers keeps the first 3 channels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .schedule import NoiseSchedule, PREDICTION_TYPES, SCHEDULE_DEFAULTS, check_choice

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                       "learned", "learned_range")
LEARNED_VARIANCE = ("learned", "learned_range")

f32 = np.float32


# --------------------------------------------------------------------------- static step options
@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The options that change the traced sampling program (everything else is plan data)."""

    kind: str  # "ddpm" | "ddim" | "dpmsolver++"
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str | None = None
    use_clipped_model_output: bool = False
    stochastic: bool = False  # the step consumes one standard normal draw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """A whole sampling run, precomputed: per-step arrays (leaves) and the static `StepConfig`."""

    timesteps: jax.Array  # (steps,) int32, the model's timestep input at each step
    coeffs: dict  # name -> (steps,) float32 (or int32 for flags)
    config: StepConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


# --------------------------------------------------------------------------- shared math
def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3), per example over all pixels.

    s = the `ratio` quantile of |x0|, clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s.
    """
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1).astype(jnp.float32)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)  # linear interpolation, as torch.quantile
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def _clip_or_threshold(x0: jax.Array, config: StepConfig) -> jax.Array:
    if config.thresholding:
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


def _split_learned_variance(model_output: jax.Array, sample: jax.Array, config: StepConfig):
    """A learned-variance model outputs 2C channels: (mean part, variance part), NHWC."""
    channels = sample.shape[-1]
    if config.variance_type in LEARNED_VARIANCE and model_output.shape[-1] == 2 * channels:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def _to_x0(model_output, sample, sqrt_alpha, sqrt_beta, prediction_type):
    """x_0 from a model output, with sqrt(alphas_cumprod_t) and sqrt(1 - alphas_cumprod_t) given."""
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha
    if prediction_type == "sample":
        return model_output
    return sqrt_alpha * sample - sqrt_beta * model_output


# --------------------------------------------------------------------------- step functions
def ddpm_step(config: StepConfig, c: Mapping[str, jax.Array], sample, model_output, noise):
    """One ancestral step x_t -> x_prev of DDPM (Ho et al. 2020, eqs. 6-7), `c` one plan row."""
    model_output, predicted_variance = _split_learned_variance(model_output, sample, config)
    x0 = _to_x0(model_output, sample, c["sqrt_alpha_prod"], c["sqrt_beta_prod"], config.prediction_type)
    x0 = _clip_or_threshold(x0, config)
    # mean of q(x_prev | x_t, x_0), eq. 7
    prev = c["x0_coeff"] * x0 + c["sample_coeff"] * sample
    if config.variance_type == "learned":
        std = predicted_variance**0.5
    elif config.variance_type == "learned_range":
        # Improved DDPM (Nichol & Dhariwal 2021, eq. 15): interpolate the log-variance
        frac = (predicted_variance + 1) / 2
        std = jnp.exp(0.5 * (frac * c["max_log"] + (1 - frac) * c["min_log"]))
    else:
        std = c["std"]
    # diffusers adds noise only when t > 0; `add_noise` is that flag as 0/1
    return prev + c["add_noise"] * (std * noise), x0


def ddim_step(config: StepConfig, c: Mapping[str, jax.Array], sample, model_output, noise):
    """One DDIM step (Song et al. 2021, eq. 12) with stochasticity eta folded into `c["std"]`."""
    model_output, _ = _split_learned_variance(model_output, sample, config)
    sqrt_alpha, sqrt_beta = c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
    if config.prediction_type == "epsilon":
        x0, eps = _to_x0(model_output, sample, sqrt_alpha, sqrt_beta, "epsilon"), model_output
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_alpha * x0) / sqrt_beta
    else:
        x0 = sqrt_alpha * sample - sqrt_beta * model_output
        eps = sqrt_alpha * model_output + sqrt_beta * sample
    x0 = _clip_or_threshold(x0, config)
    if config.use_clipped_model_output:
        eps = (sample - sqrt_alpha * x0) / sqrt_beta
    prev = c["sqrt_alpha_prod_prev"] * x0 + c["direction_coeff"] * eps
    if config.stochastic:
        prev = prev + c["std"] * noise
    return prev, x0


def dpm_solver_x0(config: StepConfig, c, sample, model_output):
    """DPM-Solver++ works on data predictions: convert the model output to x_0 (thresholded)."""
    model_output, _ = _split_learned_variance(model_output, sample, config)
    x0 = _to_x0(model_output, sample, c["alpha_s0"], c["sigma_s0"], config.prediction_type)
    if config.thresholding:
        x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    return x0


def dpm_solver_step(config: StepConfig, c, sample, x0, history, noise):
    """One multistep DPM-Solver++ update (Lu et al. 2022b, Alg. 2; order 1-3, midpoint or Heun).

    `history` = (m1, m2), the data predictions of the two previous steps. The order used at each
    step and every scalar coefficient come from the plan; unused terms have zero coefficients,
    so one traced body covers the warm-up, multistep and lower-order-final steps alike.
    """
    m0 = x0
    m1, m2 = history
    # divided differences D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
    d1_0 = c["inv_r0"] * (m0 - m1)
    d1_1 = c["inv_r1"] * (m1 - m2)
    d1 = d1_0 + c["r0_over_r0r1"] * (d1_0 - d1_1)
    d2 = c["inv_r0r1"] * (d1_0 - d1_1)
    prev = c["sample_coeff"] * sample + c["d0_coeff"] * m0 + c["d1_coeff"] * d1 + c["d2_coeff"] * d2
    if config.stochastic:
        prev = prev + c["noise_coeff"] * noise
    return prev, (m0, m1)


def scan_step(config: StepConfig, coeffs, state, model_output, noise):
    """The generic step used by `sample_loop`: state = (sample, history) -> (state, x0)."""
    sample, history = state
    model_output = model_output.astype(sample.dtype)
    if config.kind == "ddpm":
        prev, x0 = ddpm_step(config, coeffs, sample, model_output, noise)
    elif config.kind == "ddim":
        prev, x0 = ddim_step(config, coeffs, sample, model_output, noise)
    else:
        x0 = dpm_solver_x0(config, coeffs, sample, model_output)
        prev, history = dpm_solver_step(config, coeffs, sample, x0, history, noise)
    return (prev, history), x0


def init_state(config: StepConfig, latents: jax.Array):
    history = (jnp.zeros_like(latents), jnp.zeros_like(latents)) if config.kind == "dpmsolver++" else ()
    return (latents, history)


# --------------------------------------------------------------------------- the loop
def sample_loop(model_fn: Callable[[jax.Array, jax.Array], jax.Array], plan: Plan,
                latents: jax.Array, noise: jax.Array | None = None,
                key: jax.Array | None = None, trajectory: bool = False):
    """Run the whole reverse process as one `lax.scan`; returns the final sample (NHWC).

    model_fn(x, t) -> model output, x NHWC (B, H, W, C), t int32 (B,).
    noise: optional per-step standard normal draws (steps, B, H, W, C); noise[i] is used at step i.
    key: used when the plan is stochastic and `noise` is None; step i draws from fold_in(key, i).
    trajectory: also return every step's result and x_0 prediction, each (steps, B, H, W, C).
    Call it inside `jax.jit` (see `make_sample_fn`).
    """
    config = plan.config
    latents = jnp.asarray(latents, jnp.float32)
    steps = plan.num_steps
    if noise is not None and config.stochastic:
        noise = jnp.asarray(noise, latents.dtype)
        if noise.shape != (steps,) + latents.shape:
            raise ValueError(f"noise must have shape (steps, *latents.shape) = {(steps,) + latents.shape},"
                             f" got {noise.shape}")
    elif config.stochastic and key is None:
        raise ValueError("this sampler is stochastic: pass `noise` or a PRNG `key`")
    if not config.stochastic:
        noise = None

    def body(state, xs):
        index, timestep, coeffs, step_noise = xs
        sample = state[0]
        t = jnp.broadcast_to(timestep, (sample.shape[0],))
        model_output = model_fn(sample, t)
        if config.stochastic and step_noise is None:
            step_noise = jax.random.normal(jax.random.fold_in(key, index), sample.shape, sample.dtype)
        state, x0 = scan_step(config, coeffs, state, model_output, step_noise)
        return state, (state[0], x0) if trajectory else None

    xs = (jnp.arange(steps, dtype=jnp.int32), plan.timesteps, plan.coeffs, noise)
    (final, _), history = jax.lax.scan(body, init_state(config, latents), xs)
    return (final, *history) if trajectory else final


def make_sample_fn(apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]):
    """jit(sample_loop) for a model given as apply_fn(params, x, t); params are traced arguments.

    Returns fn(params, plan, latents, noise=None, key=None). It compiles once per
    (params structure, latents shape, step count, StepConfig).
    """
    @jax.jit
    def run(params, plan, latents, noise=None, key=None):
        return sample_loop(functools.partial(apply_fn, params), plan, latents, noise, key)
    return run


# --------------------------------------------------------------------------- timestep spacing
def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    n = int(num_inference_steps)
    if n != num_inference_steps or not 1 <= n <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps "
                         f"({num_train_timesteps}), got {num_inference_steps!r}")
    return n


def ddpm_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """DDPMScheduler / DDIMScheduler.set_timesteps (Lin et al. 2023, table 2), descending."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    ratio = T / n
    return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


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


# --------------------------------------------------------------------------- samplers
def _threshold_fields(sampler) -> dict:
    return dict(thresholding=bool(sampler.thresholding),
                dynamic_thresholding_ratio=float(sampler.dynamic_thresholding_ratio),
                sample_max_value=float(sampler.sample_max_value))


@dataclasses.dataclass(frozen=True)
class _SamplerBase:
    """Settings shared by the three diffusers schedulers (same names, same defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    kind = ""  # the sampler name
    diffusers_class = ""  # the diffusers scheduler class it mirrors
    # option -> the only values we implement (diffusers options outside them are an error)
    _restricted = {}

    def __post_init__(self):
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        self.schedule  # validates the beta settings now, not at the first call

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides):
        """Like diffusers' `Scheduler.from_config`: keys this scheduler has are used, the rest ignored.

        As in diffusers, keys listed in `_use_default_values` (settings the source scheduler left at
        its own defaults) are dropped, so they take this scheduler's defaults.
        """
        config = dict(config or {})
        used_defaults = set(config.pop("_use_default_values", None) or ())
        merged = {**{k: v for k, v in config.items() if k not in used_defaults}, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        for option, allowed in cls._restricted.items():
            if option in merged and merged[option] not in allowed:
                raise ValueError(f"{cls.diffusers_class} option {option}={merged[option]!r} is not "
                                 f"supported by flaxdiff: use one of {', '.join(map(repr, allowed))}")
        return cls(**{k: v for k, v in merged.items() if k in names})

    def to_config(self) -> dict:
        config = {"_class_name": self.diffusers_class, **dataclasses.asdict(self)}
        if config["trained_betas"] is not None:
            config["trained_betas"] = list(config["trained_betas"])
        return config

    @functools.cached_property
    def _alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.schedule.alphas_cumprod)

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(
            {k: getattr(self, k) for k in SCHEDULE_DEFAULTS})

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        return _check_in_range(ddpm_timesteps(self.num_train_timesteps, n, self.timestep_spacing,
                                              self.steps_offset), self)


def _check_in_range(timesteps: np.ndarray, sampler) -> np.ndarray:
    if timesteps.max() >= sampler.num_train_timesteps or timesteps.min() < 0:
        raise ValueError(
            f"steps_offset={sampler.steps_offset} with timestep_spacing={sampler.timestep_spacing!r} puts "
            f"timestep {timesteps.max()} outside 0..{sampler.num_train_timesteps - 1}: use fewer "
            f"num_inference_steps or steps_offset=0")
    return timesteps


def _prev_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step lands on: the next one in the list, -1 after the last."""
    return np.concatenate([timesteps[1:], [-1]])


@dataclasses.dataclass(frozen=True)
class DDPMSampler(_SamplerBase):
    """diffusers `DDPMScheduler` (ancestral sampling, Ho et al. 2020)."""

    variance_type: str | None = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    kind = "ddpm"
    diffusers_class = "DDPMScheduler"

    def __post_init__(self):
        super().__post_init__()
        if self.variance_type is None:  # a DPM-Solver config converted here; diffusers' DDPM
            object.__setattr__(self, "variance_type", "fixed_small")  # then acts as fixed_small
        check_choice("variance_type", self.variance_type, DDPM_VARIANCE_TYPES)

    def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
        del eta  # DDPM is always fully stochastic
        timesteps = self.timesteps(num_inference_steps)
        prev_timesteps = _prev_timesteps(timesteps)
        ac = self._alphas_cumprod
        alpha_prod = ac[timesteps]
        alpha_prod_prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], f32(1))
        beta_prod = f32(1) - alpha_prod
        beta_prod_prev = f32(1) - alpha_prod_prev
        current_alpha = alpha_prod / alpha_prod_prev
        current_beta = f32(1) - current_alpha
        # posterior variance beta~_t (Ho et al. 2020, eq. 7), computed as diffusers does
        variance = np.maximum((f32(1) - alpha_prod_prev) / (f32(1) - alpha_prod) * current_beta, f32(1e-20))
        with np.errstate(divide="ignore"):
            coeffs = {
                "sqrt_alpha_prod": alpha_prod**f32(0.5),
                "sqrt_beta_prod": beta_prod**f32(0.5),
                "x0_coeff": (alpha_prod_prev**f32(0.5) * current_beta) / beta_prod,
                "sample_coeff": current_alpha**f32(0.5) * beta_prod_prev / beta_prod,
                "add_noise": (timesteps > 0).astype(np.float32),
                "min_log": np.log(variance),
                "max_log": np.log(current_beta),
            }
        vt = self.variance_type
        if vt == "fixed_small":
            coeffs["std"] = variance**f32(0.5)
        elif vt == "fixed_small_log":
            coeffs["std"] = np.exp(f32(0.5) * np.log(variance))
        elif vt == "fixed_large":
            coeffs["std"] = current_beta**f32(0.5)
        elif vt == "fixed_large_log":
            # diffusers: `_get_variance` returns log(beta_t) and `step` takes its square root, which
            # is NaN for every beta_t < 1. The log form means std = exp(0.5 * log beta_t).
            coeffs["std"] = np.exp(f32(0.5) * np.log(current_beta))
        else:
            coeffs["std"] = np.zeros_like(variance)  # from the model's output (learned variance)
        config = StepConfig(kind="ddpm", prediction_type=self.prediction_type,
                            clip_sample=bool(self.clip_sample), clip_sample_range=float(self.clip_sample_range),
                            variance_type=vt, stochastic=True, **_threshold_fields(self))
        return _make_plan(timesteps, coeffs, config)


@dataclasses.dataclass(frozen=True)
class DDIMSampler(_SamplerBase):
    """diffusers `DDIMScheduler` (Song et al. 2021); `eta` and `use_clipped_model_output` per call."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    kind = "ddim"
    diffusers_class = "DDIMScheduler"

    def plan(self, num_inference_steps: int, eta: float = 0.0,
             use_clipped_model_output: bool = False) -> Plan:
        eta = float(eta)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
        timesteps = self.timesteps(num_inference_steps)
        # diffusers steps to `t - T // n`, right only when the timesteps are evenly spaced by T // n
        # (always for "leading"); with "linspace", or "trailing" when n does not divide T, the step
        # must land on the next timestep of the list, which is what we do.
        prev_timesteps = _prev_timesteps(timesteps)
        ac = self._alphas_cumprod
        final_alpha = f32(1) if self.set_alpha_to_one else ac[0]
        alpha_prod = ac[timesteps]
        alpha_prod_prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], final_alpha)
        beta_prod = f32(1) - alpha_prod
        beta_prod_prev = f32(1) - alpha_prod_prev
        # sigma_t^2 of eq. 16 at eta = 1
        variance = (beta_prod_prev / beta_prod) * (f32(1) - alpha_prod / alpha_prod_prev)
        std = f32(eta) * variance**f32(0.5)
        coeffs = {
            "sqrt_alpha_prod": alpha_prod**f32(0.5),
            "sqrt_beta_prod": beta_prod**f32(0.5),
            "sqrt_alpha_prod_prev": alpha_prod_prev**f32(0.5),
            # "direction pointing to x_t", eq. 12
            "direction_coeff": (f32(1) - alpha_prod_prev - std**2) ** f32(0.5),
            "std": std,
        }
        config = StepConfig(kind="ddim", prediction_type=self.prediction_type,
                            clip_sample=bool(self.clip_sample), clip_sample_range=float(self.clip_sample_range),
                            use_clipped_model_output=bool(use_clipped_model_output),
                            stochastic=eta > 0, **_threshold_fields(self))
        return _make_plan(timesteps, coeffs, config)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepSampler(_SamplerBase):
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

    kind = "dpmsolver++"
    diffusers_class = "DPMSolverMultistepScheduler"
    _restricted = {
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "use_beta_sigmas": (False, None),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False, None),
    }

    def __post_init__(self):
        super().__post_init__()
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.variance_type is not None:
            check_choice("variance_type", self.variance_type, DDPM_VARIANCE_TYPES)
        if sum([self.use_karras_sigmas, self.use_exponential_sigmas, self.use_lu_lambdas]) > 1:
            raise ValueError("use at most one of use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas")

    def _sigmas_and_timesteps(self, n: int):
        """Timesteps (int) and sigmas = sqrt((1 - a) / a) of each step plus the final one (float32)."""
        ac = self._alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ac[-1] = 2.0**-24  # diffusers: keeps the last sigma finite
        T = self.num_train_timesteps
        all_sigmas = ((f32(1) - ac) / ac) ** f32(0.5)
        with np.errstate(divide="ignore"):
            lambdas = np.log(ac**f32(0.5)) - np.log((f32(1) - ac) ** f32(0.5))
        clipped = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped, side="left"))
        timesteps = _check_in_range(dpm_timesteps(T, T - clipped, n, self.timestep_spacing,
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
        config = StepConfig(kind="dpmsolver++", prediction_type=self.prediction_type,
                            variance_type=self.variance_type, stochastic=sde, **_threshold_fields(self))
        return _make_plan(timesteps, c, config)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep with this sigma (interpolated in log sigma), as diffusers."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return float(((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma)))


def _make_plan(timesteps: np.ndarray, coeffs: dict, config: StepConfig) -> Plan:
    coeffs = {k: jnp.asarray(np.asarray(v, dtype=np.float32)) for k, v in coeffs.items()}
    return Plan(jnp.asarray(timesteps.astype(np.int32)), coeffs, config)


SAMPLER_CLASSES = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmsolver++": DPMSolverMultistepSampler,
                   "sde-dpmsolver++": DPMSolverMultistepSampler}
_CLASS_TO_KIND = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim",
                  "DPMSolverMultistepScheduler": "dpmsolver++"}


def make_sampler(sampler: str | None, config: Mapping[str, Any] | None = None):
    """A sampler of the given name built from a diffusers scheduler config, as `X.from_config` does.

    sampler None: the kind named by the config's `_class_name` (DDPM if it names none we know).
    "dpmsolver++" / "sde-dpmsolver++" set the DPM-Solver `algorithm_type`.
    """
    config = dict(config or {})
    if sampler is None:
        sampler = _CLASS_TO_KIND.get(config.get("_class_name"), "ddpm")
        if sampler == "dpmsolver++" and config.get("algorithm_type") == "sde-dpmsolver++":
            sampler = "sde-dpmsolver++"
    check_choice("sampler", sampler, SAMPLERS)
    if sampler in ("dpmsolver++", "sde-dpmsolver++"):
        config["algorithm_type"] = sampler
    return SAMPLER_CLASSES[sampler].from_config(config)
