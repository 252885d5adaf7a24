"""DDPM, DDIM and DPM-Solver++ against PyTorch diffusers: timesteps, single steps, whole trajectories.

Every comparison feeds both sides the same latents, the same per-step noise and the same model
outputs (random arrays for single steps, a fixed deterministic stand-in model for trajectories).
The largest errors are printed (run with -s) so the closing notes can quote them.
"""

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict

from flaxdiff import samplers as S
from stand_in import jax_model, nchw, nhwc, torch_model

TORCH_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
                 "sde-dpmsolver++": DPMSolverMultistepScheduler}
SHAPE = (2, 8, 8, 3)  # B, H, W, C
# the largest trajectory error seen per sampler, reported at the end of the module
LARGEST = {}


def torch_scheduler(kind, config):
    config = dict(config)
    if kind in ("dpmsolver++", "sde-dpmsolver++"):
        config["algorithm_type"] = kind
    return TORCH_CLASSES[kind](**config)


def torch_noise(steps, shape=SHAPE, seed=1000):
    """Per-step noise that DDPMScheduler.step draws from torch.Generator().manual_seed(seed + i)."""
    b, h, w, c = shape
    return np.stack([nhwc(torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(seed + i)).numpy())
                     for i in range(steps)])


def torch_run(kind, config, n, latents, noise, *, eta=0.0, use_clipped=False, model=None, outputs=None,
              ddim_prev_fix=False):
    """diffusers' sampling loop; returns per-step (samples, x0 predictions) NHWC, as float64 arrays."""
    sched = torch_scheduler(kind, config)
    sched.set_timesteps(n)
    x = torch.tensor(nchw(latents))
    samples, x0s = [], []
    timesteps = sched.timesteps.tolist()
    for i, t in enumerate(timesteps):
        mo = model(x, torch.tensor(t)) if outputs is None else torch.tensor(nchw(outputs[i]))
        if kind == "ddpm":
            out = sched.step(mo, t, x, generator=torch.Generator().manual_seed(1000 + i))
            x0s.append(out.pred_original_sample)
        elif kind == "ddim":
            if ddim_prev_fix:  # diffusers' step with the previous timestep the list's next one
                prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                sched.num_inference_steps = 1
                sched._internal_dict = FrozenDict({**sched.config, "num_train_timesteps": t - prev})
            out = sched.step(mo, t, x, eta=eta, use_clipped_model_output=use_clipped,
                             variance_noise=torch.tensor(nchw(noise[i])) if eta > 0 else None)
            x0s.append(out.pred_original_sample)
        else:
            out = sched.step(mo, t, x, variance_noise=torch.tensor(nchw(noise[i])))
            x0s.append(sched.model_outputs[-1].clone())
        x = out.prev_sample
        samples.append(x)
    return (np.stack([nhwc(s.numpy()) for s in samples]).astype(np.float64),
            np.stack([nhwc(s.numpy()) for s in x0s]).astype(np.float64), np.array(timesteps))


_jitted_loop = jax.jit(S.sample_loop, static_argnums=0, static_argnames="trajectory")


def flax_run(kind, config, n, latents, noise, *, eta=0.0, use_clipped=False, model=None, outputs=None):
    sampler = S.make_sampler(kind, config)
    plan = sampler.plan(n, eta=eta, **({"use_clipped_model_output": use_clipped} if kind == "ddim" else {}))
    if outputs is None:
        final, samples, x0s = _jitted_loop(model, plan, latents, noise, trajectory=True)
    else:  # replay given model outputs step by step through the same step function
        sample = jnp.asarray(latents)
        history = type(plan.coeffs).init_history(sample)
        samples, x0s = [], []
        for i in range(plan.num_steps):
            sample, history, x0 = plan.step_at(i).apply(plan.options, sample, history, jnp.asarray(outputs[i]),
                                                        jnp.asarray(noise[i]))
            samples.append(sample)
            x0s.append(x0)
    return np.asarray(samples, np.float64), np.asarray(x0s, np.float64), np.asarray(plan.timesteps)


def compare(kind, config, n, *, eta=0.0, use_clipped=False, outputs=None, seed=0, channels_out=None):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    noise = torch_noise(n)
    ref_sched = torch_scheduler(kind, config)
    models = {}
    if outputs is None:
        models = dict(torch_model=torch_model(ref_sched.alphas_cumprod, channels_out),
                      jax_model=jax_model(ref_sched.alphas_cumprod, channels_out))
    ref_samples, ref_x0, ref_t = torch_run(kind, config, n, latents, noise, eta=eta, use_clipped=use_clipped,
                                           model=models.get("torch_model"), outputs=outputs)
    samples, x0, t = flax_run(kind, config, n, latents, noise, eta=eta, use_clipped=use_clipped,
                              model=models.get("jax_model"), outputs=outputs)
    np.testing.assert_array_equal(t, ref_t)
    scale = max(1.0, np.abs(ref_samples).max())
    err = np.abs(samples - ref_samples).max() / scale
    x0_err = np.abs(x0 - ref_x0).max() / max(1.0, np.abs(ref_x0).max())
    return err, x0_err


# --------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver++"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T, n, offset", [(1000, 1000, 0), (1000, 50, 1), (1000, 30, 0), (1000, 7, 0),
                                          (37, 10, 1), (1000, 1, 0)])
def test_timesteps_match_set_timesteps(kind, spacing, T, n, offset):
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ref = torch_scheduler(kind, config)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(S.make_sampler(kind, config).timesteps(n), ref.timesteps.numpy())


@pytest.mark.parametrize("options", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                     dict(use_lu_lambdas=True), dict(lambda_min_clipped=-5.1),
                                     dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
                                     dict(final_sigmas_type="sigma_min", rescale_betas_zero_snr=True)])
def test_dpm_solver_sigma_options_timesteps(options):
    ref = DPMSolverMultistepScheduler(**options)
    ref.set_timesteps(12)
    np.testing.assert_array_equal(S.make_sampler("dpmsolver++", options).timesteps(12), ref.timesteps.numpy())


# --------------------------------------------------------------------------- single steps
def random_outputs(n, channels=3, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SHAPE[0], SHAPE[1], SHAPE[2], channels)).astype(np.float32) * 1.5


CLIP_MODES = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
              "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)}


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
def test_ddpm_single_steps(variance_type, prediction_type, clip_mode):
    """Every (variance, prediction, clipping) combination, over 4 respaced steps down to t = 0."""
    config = dict(variance_type=variance_type, prediction_type=prediction_type, **CLIP_MODES[clip_mode])
    outputs = random_outputs(4, channels=6 if variance_type.startswith("learned") else 3)
    if variance_type == "learned":  # a predicted variance must be positive
        outputs[..., 3:] = np.abs(outputs[..., 3:]) * 0.01
    err, x0_err = compare("ddpm", config, 4, outputs=outputs)
    assert err < 1e-5 and x0_err < 1e-5, (err, x0_err)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
@pytest.mark.parametrize("eta, use_clipped, set_alpha_to_one",
                         list(itertools.product([0.0, 0.7], [False, True], [True, False])))
def test_ddim_single_steps(prediction_type, clip_mode, eta, use_clipped, set_alpha_to_one):
    config = dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **CLIP_MODES[clip_mode])
    err, x0_err = compare("ddim", config, 5, eta=eta, use_clipped=use_clipped, outputs=random_outputs(5))
    assert err < 1e-5 and x0_err < 1e-5, (err, x0_err)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("thresholding", [False, True])
def test_dpm_solver_single_steps(algorithm, solver_order, solver_type, prediction_type, thresholding):
    """6 steps cover the warm-up (orders 1, 2), the multistep order and the lower-order final steps."""
    config = dict(solver_order=solver_order, solver_type=solver_type, prediction_type=prediction_type,
                  thresholding=thresholding, sample_max_value=1.5)
    err, x0_err = compare(algorithm, config, 6, outputs=random_outputs(6))
    assert err < 1e-5 and x0_err < 1e-5, (err, x0_err)


@pytest.mark.parametrize("options", [dict(lower_order_final=False, final_sigmas_type="sigma_min"),
                                     dict(euler_at_final=True, final_sigmas_type="sigma_min"),
                                     dict(variance_type="learned_range")])
def test_dpm_solver_final_step_options(options):
    outputs = random_outputs(6, channels=6 if "variance_type" in options else 3)
    err, x0_err = compare("dpmsolver++", options, 6, outputs=outputs)
    assert err < 1e-5 and x0_err < 1e-5, (err, x0_err)


# --------------------------------------------------------------------------- whole trajectories
TRAJECTORIES = [
    ("ddpm", {}, 1000, 0.0),
    ("ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", variance_type="fixed_large",
                  timestep_spacing="trailing"), 50, 0.0),
    ("ddpm", dict(beta_schedule="scaled_linear", prediction_type="sample", thresholding=True,
                  variance_type="learned_range", timestep_spacing="linspace"), 20, 0.0),
    ("ddpm", dict(variance_type="fixed_small_log", steps_offset=1), 25, 0.0),
    ("ddim", {}, 50, 0.0),
    ("ddim", dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False), 25, 0.5),
    ("ddim", dict(prediction_type="sample", thresholding=True), 10, 1.0),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", clip_sample=False), 1000, 0.0),
    ("dpmsolver++", {}, 25, 0.0),
    ("dpmsolver++", dict(solver_order=3, timestep_spacing="leading", steps_offset=1), 50, 0.0),
    ("dpmsolver++", dict(solver_order=1), 10, 0.0),
    ("dpmsolver++", dict(solver_type="heun", prediction_type="v_prediction", thresholding=True,
                         final_sigmas_type="sigma_min", lower_order_final=False), 20, 0.0),
    ("dpmsolver++", dict(use_karras_sigmas=True), 15, 0.0),
    ("sde-dpmsolver++", {}, 25, 0.0),
]


@pytest.mark.parametrize("kind, config, n, eta", TRAJECTORIES,
                         ids=[f"{k}-{n}-{i}" for i, (k, _, n, _) in enumerate(TRAJECTORIES)])
def test_trajectory_parity(kind, config, n, eta):
    channels_out = 6 if config.get("variance_type") == "learned_range" else None
    err, x0_err = compare(kind, config, n, eta=eta, channels_out=channels_out)
    LARGEST[kind] = max(LARGEST.get(kind, 0.0), err)
    print(f"\n{kind} {config} steps={n} eta={eta}: max |trajectory error| {err:.2e}, x0 {x0_err:.2e}")
    assert err < 2e-5 and x0_err < 2e-5, (err, x0_err)


def test_report_largest_trajectory_errors():
    print("\nlargest trajectory errors:", {k: f"{v:.2e}" for k, v in LARGEST.items()})


# --------------------------------------------------------------------------- diffusers' known bugs
def test_ddpm_fixed_large_log_is_right_where_diffusers_is_nan():
    """diffusers takes sqrt(log beta_t), NaN for every t > 0; we use std = exp(0.5 log beta_t)."""
    n = 5
    outputs = random_outputs(n)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    noise = torch_noise(n)
    ref_log, _, _ = torch_run("ddpm", dict(variance_type="fixed_large_log"), n, latents, noise, outputs=outputs)
    assert np.isnan(ref_log[0]).all()
    ours, _, _ = flax_run("ddpm", dict(variance_type="fixed_large_log"), n, latents, noise, outputs=outputs)
    ref_large, _, _ = torch_run("ddpm", dict(variance_type="fixed_large"), n, latents, noise, outputs=outputs)
    np.testing.assert_allclose(ours, ref_large, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing, n", [("linspace", 10), ("trailing", 30)])
def test_ddim_previous_timestep_is_the_next_in_the_list(spacing, n):
    """diffusers steps DDIM from t to t - T // n; with linspace spacing (or trailing when n does
    not divide T) that is not the next timestep, so the trajectory skips or repeats noise levels.
    We land on the next timestep: equal to diffusers' step given the right previous timestep,
    and measurably different from diffusers as it is."""
    config = dict(timestep_spacing=spacing)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    noise = torch_noise(n)
    ref = torch_scheduler("ddim", config)
    model_t, model_j = torch_model(ref.alphas_cumprod), jax_model(ref.alphas_cumprod)
    ours, _, _ = flax_run("ddim", config, n, latents, noise, eta=0.5, model=model_j)
    fixed, _, _ = torch_run("ddim", config, n, latents, noise, eta=0.5, model=model_t, ddim_prev_fix=True)
    as_is, _, _ = torch_run("ddim", config, n, latents, noise, eta=0.5, model=model_t)
    np.testing.assert_allclose(ours, fixed, rtol=0, atol=2e-5)
    assert np.abs(ours - as_is).max() > 1e-3


def test_ddim_leading_spacing_needs_no_fix():
    err, _ = compare("ddim", dict(timestep_spacing="leading", steps_offset=1), 30, eta=0.5,
                     outputs=random_outputs(30))
    assert err < 1e-5


# --------------------------------------------------------------------------- one compiled program
def sample_fn(apply_fn):
    """jit(sample_loop) for a model given as apply_fn(params, x, t), params a traced argument."""
    @jax.jit
    def run(params, plan, latents, noise=None, key=None):
        return S.sample_loop(functools.partial(apply_fn, params), plan, latents, noise, key)
    return run


def _stand_in_apply(alphas_cumprod, x, t):
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    h = x
    for k in range(6):  # some depth, so compile time is not all fixed overhead
        h = jnp.tanh(h * (1.0 + 0.1 * k)) + 0.05 * jnp.sin(h + k)
    return (1 - a) ** 0.5 * x / (a * 0.25 + 1 - a) + 0.05 * h


def test_sampler_compiles_once_per_shape_and_step_count():
    run = sample_fn(_stand_in_apply)
    sampler = S.make_sampler("ddim", {})
    params = sampler.schedule.alphas_cumprod
    latents = jnp.zeros((2, 8, 8, 3))
    key = jax.random.key(0)
    run(params, sampler.plan(50, eta=0.5), latents, key=key)
    # other eta, other timestep spacing, other betas: same program
    run(params, sampler.plan(50, eta=1.0), latents, key=key)
    other = S.make_sampler("ddim", dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"))
    run(other.schedule.alphas_cumprod, other.plan(50, eta=0.3), latents, key=key)
    assert run._cache_size() == 1
    run(params, sampler.plan(20, eta=0.5), latents, key=key)  # new step count
    assert run._cache_size() == 2
    run(params, sampler.plan(20, eta=0.5), jnp.zeros((4, 8, 8, 3)), key=key)  # new shape
    assert run._cache_size() == 3


@pytest.mark.parametrize("kind", ["ddpm", "dpmsolver++"])
def test_compile_time_does_not_grow_with_steps(kind):
    sampler = S.make_sampler(kind, {})
    params = sampler.schedule.alphas_cumprod
    latents = jnp.zeros((2, 8, 8, 3))

    def compile_seconds(n):
        best = np.inf
        for _ in range(2):
            # a constant never used before makes a program no compilation cache has seen
            salt = float(time.perf_counter_ns() % 100003)
            apply = lambda p, x, t: _stand_in_apply(p, x * (1.0 + salt * 1e-9), t)  # noqa: E731
            lowered = sample_fn(apply).lower(params, sampler.plan(n), latents, key=jax.random.key(0))
            start = time.perf_counter()
            lowered.compile()
            best = min(best, time.perf_counter() - start)
        return best, lowered.as_text().count("\n")

    (t50, lines50), (t1000, lines1000) = compile_seconds(50), compile_seconds(1000)
    print(f"\n{kind} compile: 50 steps {t50:.3f}s, 1000 steps {t1000:.3f}s")
    assert lines50 == lines1000  # the same program: the step count is only an array length
    assert t1000 < 1.5 * t50 + 0.1


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind, config, n, match", [
    ("ddpm", dict(beta_schedule="cosine"), 10, "beta_schedule 'cosine'.*choose one of 'linear'"),
    ("ddim", dict(prediction_type="x0"), 10, "prediction_type 'x0'.*'epsilon', 'sample', 'v_prediction'"),
    ("ddpm", dict(variance_type="fixed"), 10, "variance_type 'fixed'.*'fixed_small'"),
    ("dpmsolver++", dict(timestep_spacing="uniform"), 10, "timestep_spacing 'uniform'.*'leading', 'trailing', 'linspace'"),
    ("ddpm", {}, 1001, "num_inference_steps must be an integer from 1 to num_train_timesteps \\(1000\\), got 1001"),
    ("ddim", dict(num_train_timesteps=50), 51, "from 1 to num_train_timesteps \\(50\\), got 51"),
    ("dpmsolver++", {}, 0, "got 0"),
    ("dpmsolver++", dict(use_beta_sigmas=True), 10, "use_beta_sigmas=True is not supported"),
    ("dpmsolver++", dict(solver_order=4), 10, "solver_order 4.*1, 2, 3"),
    ("ddim", dict(steps_offset=1), 1000, "steps_offset=1 .* puts timestep 1000 outside 0..999"),
])
def test_bad_input_raises_one_clear_value_error(kind, config, n, match):
    with pytest.raises(ValueError, match=match):
        S.make_sampler(kind, config).plan(n)


def test_bad_sampler_name_and_eta():
    with pytest.raises(ValueError, match="sampler 'euler'.*'ddpm', 'ddim', 'dpmsolver\\+\\+'"):
        S.make_sampler("euler", {})
    with pytest.raises(ValueError, match="eta must be >= 0"):
        S.make_sampler("ddim", {}).plan(10, eta=-0.1)


def test_bad_noise_shape_and_missing_key():
    plan = S.make_sampler("ddpm", {}).plan(5)
    model = jax_model(S.make_sampler("ddpm", {}).schedule.alphas_cumprod)
    with pytest.raises(ValueError, match=r"noise must have shape \(steps, \*latents.shape\)"):
        S.sample_loop(model, plan, jnp.zeros(SHAPE), noise=jnp.zeros((4,) + SHAPE))
    with pytest.raises(ValueError, match="stochastic: pass `noise` or a PRNG `key`"):
        S.sample_loop(model, plan, jnp.zeros(SHAPE))


def test_sampler_from_diffusers_config_round_trip():
    """from_config takes a diffusers scheduler config the way diffusers' from_config does: other
    schedulers' keys are ignored, and settings the source left at its defaults take ours."""
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    for source in (ddpm, DDPMScheduler(timestep_spacing="trailing", steps_offset=1)):
        dpm_ref = DPMSolverMultistepScheduler.from_config(source.config)
        dpm = S.make_sampler("dpmsolver++", source.config)
        for key in ("timestep_spacing", "steps_offset", "prediction_type", "beta_schedule"):
            assert getattr(dpm, key) == dpm_ref.config[key], key
    assert S.make_sampler("dpmsolver++", ddpm.config).timestep_spacing == "linspace"
    assert S.make_sampler(None, ddpm.config).kind == "ddpm"
    assert S.make_sampler(None, {"_class_name": "DPMSolverMultistepScheduler"}).kind == "dpmsolver++"
    ddim = S.make_sampler("ddim", {"clip_sample": False})
    assert S.DDIMSampler.from_config(ddim.to_config()) == ddim
