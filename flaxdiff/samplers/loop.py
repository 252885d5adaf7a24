"""The whole reverse process as one `jax.lax.scan`: one dispatch per trajectory.

Only the array shapes and the plan's static `StepOptions` shape the compiled program, so it
compiles once per (batch shape, step count) and its compile time does not depend on the number of
steps (the step count is an array length).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .base import Plan


def sample_loop(model_fn: Callable[[jax.Array, jax.Array], jax.Array], plan: Plan,
                latents: jax.Array, noise: jax.Array | None = None,
                key: jax.Array | None = None, trajectory: bool = False):
    """Run the whole reverse process as one `lax.scan`; returns the final sample (NHWC).

    model_fn(x, t) -> model output, x NHWC (B, H, W, C), t int32 (B,).
    noise: optional per-step standard normal draws (steps, B, H, W, C); noise[i] is used at step i.
    key: used when the plan is stochastic and `noise` is None; step i draws from fold_in(key, i).
    trajectory: also return every step's result and x_0 prediction, each (steps, B, H, W, C).
    Call it inside `jax.jit` (`flaxdiff.pipeline.sample_program` does).
    """
    options = plan.options
    latents = jnp.asarray(latents, jnp.float32)
    steps = plan.num_steps
    if noise is not None and options.stochastic:
        noise = jnp.asarray(noise, latents.dtype)
        if noise.shape != (steps,) + latents.shape:
            raise ValueError(f"noise must have shape (steps, *latents.shape) = {(steps,) + latents.shape},"
                             f" got {noise.shape}")
    elif options.stochastic and key is None:
        raise ValueError("this sampler is stochastic: pass `noise` or a PRNG `key`")
    if not options.stochastic:
        noise = None

    def body(carry, xs):
        sample, history = carry
        index, timestep, step, step_noise = xs
        t = jnp.broadcast_to(timestep, (sample.shape[0],))
        model_output = model_fn(sample, t).astype(sample.dtype)
        if options.stochastic and step_noise is None:
            step_noise = jax.random.normal(jax.random.fold_in(key, index), sample.shape, sample.dtype)
        sample, history, x0 = step.apply(options, sample, history, model_output, step_noise)
        return (sample, history), (sample, x0) if trajectory else None

    xs = (jnp.arange(steps, dtype=jnp.int32), plan.timesteps, plan.coeffs, noise)
    init = (latents, type(plan.coeffs).init_history(latents))
    (final, _), outputs = jax.lax.scan(body, init, xs)
    return (final, *outputs) if trajectory else final
