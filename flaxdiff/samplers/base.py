"""What every sampler shares: the plan, the static step options, timestep spacing, clipping.

A sampler (`DDPMSampler`, `DDIMSampler`, `DPMSolverMultistepSampler`) is a frozen dataclass of
the diffusers scheduler settings. `sampler.plan(num_inference_steps, eta)` does all the per-step
scalar arithmetic on the host, in float32 and in diffusers' operation order, and returns a
`Plan`: the timesteps, the sampler's own typed coefficients (a `SamplerStep`, each field of
shape (steps,)), and the small static `StepOptions` that shape the traced program. The loop
(`flaxdiff.samplers.loop.sample_loop`) slices one row of coefficients per step and calls its
`apply`; nothing else about a sampler reaches the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..choices import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, TIMESTEP_SPACINGS, check_choice
from ..schedule import SCHEDULE_DEFAULTS, NoiseSchedule

f32 = np.float32


# --------------------------------------------------------------------------- the plan -> step contract
@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The options that change the traced sampling program (everything else is plan data)."""

    kind: str  # the sampler's name, for messages
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str | None = None
    use_clipped_model_output: bool = False
    stochastic: bool = False  # the step consumes one standard normal draw


class SamplerStep:
    """Base of a sampler's per-step coefficients: a pytree dataclass whose fields are (steps,)
    arrays in a plan and scalars inside the scan, with the update that uses them."""

    @classmethod
    def init_history(cls, latents: jax.Array) -> Any:
        """What the step carries from one step to the next besides the sample (multistep solvers)."""
        return ()

    def apply(self, options: StepOptions, sample, history, model_output, noise):
        """One update x_t -> x_prev: returns (x_prev, history, x0 prediction)."""
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """A whole sampling run, precomputed: timesteps, typed per-step coefficients, static options."""

    timesteps: jax.Array  # (steps,) int32, the model's timestep input at each step
    coeffs: SamplerStep  # the sampler's coefficients, each field (steps,)
    options: StepOptions = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def kind(self) -> str:
        return self.options.kind

    def step_at(self, index: int) -> SamplerStep:
        """The coefficients of step `index` (what the scan hands to `apply`)."""
        return jax.tree.map(lambda values: values[index], self.coeffs)


def make_plan(timesteps: np.ndarray, coeffs_class: type, coeffs: Mapping[str, np.ndarray],
              options: StepOptions) -> Plan:
    arrays = {name: jnp.asarray(np.asarray(value, dtype=np.float32)) for name, value in coeffs.items()}
    return Plan(jnp.asarray(timesteps.astype(np.int32)), coeffs_class(**arrays), options)


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


def clip_or_threshold(x0: jax.Array, options: StepOptions) -> jax.Array:
    if options.thresholding:
        return threshold_sample(x0, options.dynamic_thresholding_ratio, options.sample_max_value)
    if options.clip_sample:
        return jnp.clip(x0, -options.clip_sample_range, options.clip_sample_range)
    return x0


def split_learned_variance(model_output: jax.Array, sample: jax.Array, options: StepOptions):
    """A learned-variance model outputs 2C channels: (mean part, variance part), NHWC."""
    channels = sample.shape[-1]
    if options.variance_type in LEARNED_VARIANCE_TYPES and model_output.shape[-1] == 2 * channels:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


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


def check_in_range(timesteps: np.ndarray, sampler) -> np.ndarray:
    if timesteps.max() >= sampler.num_train_timesteps or timesteps.min() < 0:
        raise ValueError(
            f"steps_offset={sampler.steps_offset} with timestep_spacing={sampler.timestep_spacing!r} puts "
            f"timestep {timesteps.max()} outside 0..{sampler.num_train_timesteps - 1}: use fewer "
            f"num_inference_steps or steps_offset=0")
    return timesteps


def prev_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step lands on: the next one in the list, -1 after the last."""
    return np.concatenate([timesteps[1:], [-1]])


def threshold_options(sampler) -> dict:
    return dict(thresholding=bool(sampler.thresholding),
                dynamic_thresholding_ratio=float(sampler.dynamic_thresholding_ratio),
                sample_max_value=float(sampler.sample_max_value))


# --------------------------------------------------------------------------- the sampler base
@dataclasses.dataclass(frozen=True)
class SamplerBase:
    """Settings shared by the diffusers schedulers (same names, same defaults)."""

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

    kind: ClassVar[str] = ""  # the sampler's registered name (flaxdiff.choices.SAMPLERS)
    diffusers_class: ClassVar[str] = ""  # the diffusers scheduler class it mirrors
    # option -> the only values we implement (diffusers options outside them are an error)
    _restricted: ClassVar[dict] = {}

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
    def alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.schedule.alphas_cumprod)

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config({k: getattr(self, k) for k in SCHEDULE_DEFAULTS})

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        return check_in_range(ddpm_timesteps(self.num_train_timesteps, n, self.timestep_spacing,
                                             self.steps_offset), self)

    def default_num_inference_steps(self) -> int:
        """diffusers' pipeline default: 50 steps (DDPMPipeline overrides it with 1000)."""
        return min(50, self.num_train_timesteps)

    def plan(self, num_inference_steps: int, eta: float = 0.0, **options) -> Plan:
        raise NotImplementedError
