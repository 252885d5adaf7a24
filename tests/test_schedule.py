"""NoiseSchedule, add_noise, get_velocity and prediction-type conversions against PyTorch diffusers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from flaxdiff.schedule import (NoiseSchedule, add_noise, get_velocity, output_from_x0_eps,
                               to_x0_eps, training_target)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37, 4000])
def test_schedule_arrays_bitwise(beta_schedule, num_train_timesteps):
    kw = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
              beta_start=0.00085, beta_end=0.012)
    ref = DDPMScheduler(**kw)
    ours = NoiseSchedule.from_config(kw)
    if beta_schedule != "sigmoid":
        np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas), ref.alphas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    # torch's vectorised float32 sigmoid is not correctly rounded: a few betas differ by 1 ulp
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=3e-7, atol=0)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_schedule_zero_terminal_snr(beta_schedule):
    kw = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=True)
    ref = DDPMScheduler(**kw)
    ours = NoiseSchedule.from_config(kw)
    # torch's vectorised float32 sqrt is not correctly rounded on this CPU, so 1-ulp differences
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=3e-6)
    # betas = 1 - alphas with alphas near 1: an ulp of alphas is 6e-8 of absolute error in betas
    # and near the end, sqrt(alphas_cumprod) - its last value cancels: 1 ulp becomes ~1e-5 relative
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=5e-5, atol=1e-6)
    assert float(ours.alphas_cumprod[-1]) == 0.0


def test_trained_betas_and_keyword_construction():
    betas = np.linspace(1e-4, 0.05, 50) ** 1.5
    ref = DDIMScheduler(trained_betas=betas.tolist(), num_train_timesteps=50)
    ours = NoiseSchedule.from_config({"trained_betas": betas.tolist()})
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert ours.num_train_timesteps == 50
    kw = NoiseSchedule.from_config(beta_schedule="scaled_linear", num_train_timesteps=10)
    np.testing.assert_array_equal(np.asarray(kw.betas),
                                  DDPMScheduler(beta_schedule="scaled_linear", num_train_timesteps=10).betas.numpy())


@pytest.fixture(scope="module")
def noisy_batch():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
    noise = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    timesteps = np.array([0, 1, 250, 500, 998, 999])
    return x0, noise, timesteps


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_add_noise_and_velocity(noisy_batch, beta_schedule):
    x0, noise, timesteps = noisy_batch
    ref = DDPMScheduler(beta_schedule=beta_schedule)
    schedule = NoiseSchedule.from_config(ref.config)
    tx0, tnoise, tt = (torch.tensor(np.moveaxis(x0, -1, 1)), torch.tensor(np.moveaxis(noise, -1, 1)),
                       torch.tensor(timesteps))
    ref_noisy = np.moveaxis(ref.add_noise(tx0, tnoise, tt).numpy(), 1, -1)
    ref_v = np.moveaxis(ref.get_velocity(tx0, tnoise, tt).numpy(), 1, -1)
    noisy = np.asarray(add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps)))
    v = np.asarray(get_velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps)))
    np.testing.assert_allclose(noisy, ref_noisy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(v, ref_v, rtol=0, atol=1e-6)
    # the v_prediction training target is diffusers' get_velocity
    target = training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps), "v_prediction")
    np.testing.assert_allclose(np.asarray(target), ref_v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_type_conversions_round_trip(noisy_batch, prediction_type):
    x0, noise, timesteps = noisy_batch
    schedule = NoiseSchedule.from_config()
    t = jnp.asarray(timesteps[1:-1])  # the extremes make x0 or eps ill-conditioned
    x0, noise = jnp.asarray(x0[1:-1]), jnp.asarray(noise[1:-1])
    xt = add_noise(schedule, x0, noise, t)
    out = training_target(schedule, x0, noise, t, prediction_type)
    rx0, reps = to_x0_eps(schedule, out, xt, t, prediction_type)
    np.testing.assert_allclose(np.asarray(rx0), np.asarray(x0), atol=2e-3)
    np.testing.assert_allclose(np.asarray(reps), np.asarray(noise), atol=2e-3)
    alpha = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(output_from_x0_eps(rx0, reps, alpha, prediction_type)),
                               np.asarray(out), atol=2e-3)


def test_pred_x0_matches_diffusers_step(noisy_batch):
    """x0 implied by each prediction type equals DDPMScheduler.step's pred_original_sample."""
    _, noise, _ = noisy_batch
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    for prediction_type in ["epsilon", "sample", "v_prediction"]:
        ref = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
        ref.set_timesteps(1000)
        out = ref.step(torch.tensor(np.moveaxis(noise[:2], -1, 1)), 600,
                       torch.tensor(np.moveaxis(sample, -1, 1)), generator=torch.Generator().manual_seed(0))
        schedule = NoiseSchedule.from_config(ref.config)
        x0, _ = to_x0_eps(schedule, jnp.asarray(noise[:2]), jnp.asarray(sample), jnp.array([600, 600]),
                          prediction_type)
        np.testing.assert_allclose(np.asarray(x0), np.moveaxis(out.pred_original_sample.numpy(), 1, -1),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule="cosine"), "beta_schedule 'cosine'.*'linear'"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
])
def test_bad_schedule_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config(kwargs)


def test_bad_prediction_type():
    schedule = NoiseSchedule.from_config()
    with pytest.raises(ValueError, match="prediction_type 'eps'.*'epsilon', 'sample', 'v_prediction'"):
        training_target(schedule, jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)), jnp.array([3]), "eps")
