"""A fixed deterministic stand-in for a denoiser, written once for torch (NCHW) and JAX (NHWC).

It is the optimal noise predictor for data ~ N(0, 0.5^2) plus a small nonlinear term, so
trajectories stay O(1) like a real model's, and every sampler option is exercised.
"""

import jax.numpy as jnp
import numpy as np
import torch

DATA_VAR = 0.25


def torch_model(alphas_cumprod: torch.Tensor, channels_out: int | None = None):
    def model(x, t):
        t = t.reshape(-1).expand(x.shape[0])
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (1 - a) ** 0.5 * x / (a * DATA_VAR + 1 - a)
        out = eps + 0.1 * torch.tanh(x) * torch.cos(t.float() / 300.0).reshape(-1, 1, 1, 1)
        if channels_out and channels_out == 2 * x.shape[1]:  # learned variance in [-1, 1]
            out = torch.cat([out, torch.tanh(x)], dim=1)
        return out
    return model


def jax_model(alphas_cumprod, channels_out: int | None = None):
    alphas_cumprod = jnp.asarray(np.asarray(alphas_cumprod))

    def model(x, t):
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (1 - a) ** 0.5 * x / (a * DATA_VAR + 1 - a)
        out = eps + 0.1 * jnp.tanh(x) * jnp.cos(t.astype(jnp.float32) / 300.0).reshape(-1, 1, 1, 1)
        if channels_out and channels_out == 2 * x.shape[-1]:
            out = jnp.concatenate([out, jnp.tanh(x)], axis=-1)
        return out
    return model


def nchw(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3))


def nhwc(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -3, -1))
