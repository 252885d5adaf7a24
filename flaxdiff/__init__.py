"""flaxdiff: DDPM-family diffusion models in JAX/Flax NNX, number-for-number compatible with diffusers."""

from . import _xla_flags  # noqa: F401  (must run before JAX initialises its backends)

from .unet import UNet2D, UNet2DConfig
from .schedule import NoiseSchedule, add_noise, get_velocity, to_x0_eps, training_target
from .pipeline import DiffusionPipeline
from .samplers import (DDIMSampler, DDPMSampler, DPMSolverMultistepSampler, Plan, make_sample_fn,
                       make_sampler, sample_loop)

__version__ = "0.1.0"
