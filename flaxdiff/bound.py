"""Held-out negative log-likelihood in bits/dim from the DDPM variational bound.

The command line is `python -m flaxdiff.evaluate` (flaxdiff/evaluate.py). The bound (Ho et al.
2020, eq. 5) on -log p(x_0) for 8-bit images scaled to [-1, 1]:

    L = KL(q(x_T | x_0) || N(0, I))                                   the prior term
      + sum_{t=1}^{T-1} E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
      - E_q log p(x_0 | x_1)                                          a discretised Gaussian decoder

(diffusers' 0-based timesteps: t = 0 is the decoder, t = 1..T-1 the KL terms). Each term is exact
in closed form given one draw of x_t. Evaluated over every timestep (`exact`) or as the unbiased
Monte-Carlo estimate prior + T * mean_k L_{t_k} over `num_timesteps` uniformly drawn timesteps;
the standard error is over images. p's mean comes from the model's x_0 prediction (clipped when
the scheduler clips), its variance from the scheduler's variance_type (fixed_small: the posterior
variance; fixed_large: beta_t; learned_range: the model's output), with improved-DDPM's convention
for t = 0 (the posterior variance of t = 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from .images import to_model_range
from .parallel import to_host
from .samplers import make_sampler
from .schedule import posterior, x0_eps_from_output

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- closed forms
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, exp(log_scales)^2), 256 bins of width 2/255 on [-1, 1];
    the edge bins extend to -inf / +inf (Ho et al. 2020, eq. 13). Exact normal CDF, in log space."""
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (x - means + 1.0 / 255.0)
    lower = inv_std * (x - means - 1.0 / 255.0)
    log_cdf_upper = log_ndtr(upper)
    log_survival_lower = log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) computed from the side of the bin with the larger mass
    log_mid = jnp.where(lower > 0,
                        log_survival_lower + jnp.log1p(-jnp.exp(log_ndtr(-upper) - log_survival_lower)),
                        log_cdf_upper + jnp.log1p(-jnp.exp(log_ndtr(lower) - log_cdf_upper)))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_survival_lower, log_mid))


@dataclasses.dataclass(frozen=True)
class BoundConstants:
    """Per-timestep constants of the bound, computed in float64 on the host."""

    num_train_timesteps: int
    prediction_type: str
    variance_type: str
    clip: float | None  # clip the x_0 prediction to [-clip, clip], or None
    arrays: dict  # name -> (T,) float32

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], clip_denoised: bool | None = None):
        sampler = make_sampler("ddpm", config)
        betas = np.asarray(sampler.schedule.betas, np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        previous = np.append(1.0, alphas_cumprod[:-1])
        mean_coef1, mean_coef2, posterior_variance, _ = posterior(alphas_cumprod, previous)
        # t = 0 has zero posterior variance: use t = 1's (improved DDPM's clipped log variance)
        posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        variance_type = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(
            sampler.variance_type, sampler.variance_type)
        if variance_type == "fixed_large":
            model_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
        elif variance_type == "fixed_small":
            model_log_variance = posterior_log_variance
        elif variance_type == "learned_range":
            model_log_variance = np.full_like(betas, np.nan)  # from the model's output
        else:
            raise ValueError(f"bits/dim needs a fixed or learned_range variance, not {sampler.variance_type!r}")
        clip = sampler.clip_sample if clip_denoised is None else clip_denoised
        arrays = {
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "alphas_cumprod": alphas_cumprod,
            "posterior_mean_coef1": mean_coef1,
            "posterior_mean_coef2": mean_coef2,
            "posterior_log_variance": posterior_log_variance,
            "model_log_variance": model_log_variance,
            "max_log_variance": np.log(betas),
        }
        return cls(len(betas), sampler.prediction_type, variance_type,
                   float(sampler.clip_sample_range) if clip else None,
                   {k: v.astype(np.float32) for k, v in arrays.items()})


def prior_nats(x0, constants: BoundConstants):
    """KL(q(x_T | x_0) || N(0, I)) per image, summed over pixels (nats)."""
    a = constants.arrays
    mean = a["sqrt_alphas_cumprod"][-1] * x0
    logvar = jnp.log1p(-jnp.asarray(a["alphas_cumprod"][-1]))
    return normal_kl(mean, logvar, 0.0, 0.0).reshape(x0.shape[0], -1).sum(-1)


def term_nats(model_fn: Callable, x0, t, noise, constants: BoundConstants):
    """L_t per image (nats): the decoder NLL where t == 0, the KL term elsewhere. t: (B,) int;
    model_fn(x_t, t) -> the model output."""
    a = {k: jnp.asarray(v)[t].reshape(-1, 1, 1, 1) for k, v in constants.arrays.items()}
    x_t = a["sqrt_alphas_cumprod"] * x0 + a["sqrt_one_minus_alphas_cumprod"] * noise
    output = model_fn(x_t, t).astype(jnp.float32)
    channels = x0.shape[-1]
    if constants.variance_type == "learned_range":
        output, variance_output = output[..., :channels], output[..., channels:]
        frac = (variance_output + 1) / 2
        model_logvar = frac * a["max_log_variance"] + (1 - frac) * a["posterior_log_variance"]
    else:
        model_logvar = a["model_log_variance"]
    x0_pred, _ = x0_eps_from_output(output, x_t, a["alphas_cumprod"], constants.prediction_type)
    if constants.clip is not None:
        x0_pred = jnp.clip(x0_pred, -constants.clip, constants.clip)
    model_mean = a["posterior_mean_coef1"] * x0_pred + a["posterior_mean_coef2"] * x_t
    true_mean = a["posterior_mean_coef1"] * x0 + a["posterior_mean_coef2"] * x_t
    per_pixel_kl = normal_kl(true_mean, a["posterior_log_variance"], model_mean, model_logvar)
    per_pixel_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    batch = x0.shape[0]
    kl, nll = per_pixel_kl.reshape(batch, -1).sum(-1), per_pixel_nll.reshape(batch, -1).sum(-1)
    return jnp.where(t == 0, nll, kl)


# --------------------------------------------------------------------------- estimators
@dataclasses.dataclass
class BitsPerDim:
    bits_per_dim: float
    standard_error: float
    num_images: int
    num_timesteps: int | str
    per_image: np.ndarray  # bits/dim of each image

    def __str__(self) -> str:
        return (f"{self.bits_per_dim:.4f} ± {self.standard_error:.4f} bits/dim "
                f"({self.num_images} images, {self.num_timesteps} timesteps each)")


def bits_per_dim(model_fn: Callable, images_uint8: np.ndarray, scheduler_config: Mapping[str, Any],
                 num_timesteps: int | None = None, batch_size: int = 64, seed: int = 0,
                 clip_denoised: bool | None = None, progress: bool = False, params: Any = None,
                 labels: np.ndarray | None = None) -> BitsPerDim:
    """The variational bound in bits/dim on uint8 NHWC images.

    num_timesteps None: exact, every timestep (T model calls per image); an int K: the unbiased
    Monte-Carlo estimate over K uniform timesteps per image. The timesteps and noise are a function
    of (seed, image position, batch_size) only, so two models scored with the same arguments see
    the same draws and their difference pairs up.
    model_fn(params, x, t, labels) -> model output: `params` (the weights, a traced argument, so
    other weights reuse the compiled program) and `labels` (int (B,) class labels, or None) are
    passed through.
    """
    from tqdm.auto import tqdm

    constants = BoundConstants.from_scheduler_config(scheduler_config, clip_denoised)
    T = constants.num_train_timesteps
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise ValueError(f"images must be uint8 NHWC, got {images_uint8.dtype} {images_uint8.shape}")
    n, dims = len(images_uint8), int(np.prod(images_uint8.shape[1:]))
    exact = num_timesteps is None
    per_call = T if exact else num_timesteps

    @jax.jit
    def batch_terms(params, x0, ts, key, labels):
        """(K, B) nats for timesteps ts (K, B)."""
        def one(t, k):
            noise = jax.random.normal(jax.random.fold_in(key, k), x0.shape, jnp.float32)
            return term_nats(lambda x, time: model_fn(params, x, time, labels), x0, t, noise, constants)
        return jax.lax.map(lambda tk: one(*tk), (ts, jnp.arange(ts.shape[0])))

    prior_fn = jax.jit(lambda x0: prior_nats(x0, constants))
    base = jax.random.key(seed)
    totals = []
    batches = range(0, n, batch_size)
    for index in tqdm(batches, desc="bits/dim", disable=not progress, unit="batch"):
        chunk = images_uint8[index:index + batch_size]
        x0 = jnp.asarray(to_model_range(chunk))
        key = jax.random.fold_in(jax.random.fold_in(base, 0), index)  # the noise draws of this batch
        if exact:
            ts = np.broadcast_to(np.arange(T)[:, None], (T, len(chunk)))
        else:
            ts_key = jax.random.fold_in(jax.random.fold_in(base, 1), index)
            ts = np.asarray(jax.random.randint(ts_key, (num_timesteps, len(chunk)), 0, T))
        chunk_labels = None if labels is None else jnp.asarray(labels[index:index + batch_size], jnp.int32)
        terms = to_host(batch_terms(params, x0, jnp.asarray(ts, jnp.int32), key, chunk_labels)).astype(np.float64)
        sum_terms = terms.sum(0) if exact else T * terms.mean(0)
        totals.append(to_host(prior_fn(x0)).astype(np.float64) + sum_terms)
    per_image = np.concatenate(totals) / (dims * LN2)
    error = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return BitsPerDim(float(per_image.mean()), error, n, "all" if exact else per_call, per_image)


def unet_model_fn(graphdef) -> Callable:
    """model_fn(params, x, t, labels) of a Flax UNet2D given as (graphdef, params): for bits_per_dim."""
    from flax import nnx

    return lambda params, x, t, labels: nnx.merge(graphdef, params)(x, t, class_labels=labels)


def pipeline_bits_per_dim(pipe, images_uint8: np.ndarray, labels: np.ndarray | None = None,
                          **kwargs) -> BitsPerDim:
    """bits_per_dim for a DiffusionPipeline's UNet and scheduler config; a class-conditional
    pipeline needs the images' class labels (the bound of p(x | label))."""
    from flax import nnx

    if (labels is None) != (pipe.class_labels is None):
        raise ValueError("a class-conditional model is scored with the images' labels, an unconditional one without")
    graphdef, state = nnx.split(pipe.unet)
    return bits_per_dim(unet_model_fn(graphdef), images_uint8, pipe.scheduler_config, params=state, labels=labels,
                        **kwargs)
