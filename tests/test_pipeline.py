"""DiffusionPipeline end to end against PyTorch diffusers pipelines, and the folder round trip."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,
                       DPMSolverMultistepScheduler)

from flaxdiff import DiffusionPipeline
from flaxdiff.compat import set_mesh
from flaxdiff.diffusers_io import unet_state_dict
from flaxdiff.pipeline import sample_program
from stand_in import nhwc
from torch_models import TINY, perturbed_unet

# largest pixel error against diffusers measured 3.6e-7 (DDPM), 4.2e-7 (DDIM), 5.4e-7 (DPM-Solver++)
# with jax 0.10.2 and torch 2.13 on the CPU: ~10x
PIXEL_TOLERANCE = 5e-6
SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
                 clip_sample=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers DDPMPipeline folder written by PyTorch diffusers, with a non-default scheduler."""
    path = tmp_path_factory.mktemp("ddpm-pipeline")
    DDPMPipeline(unet=perturbed_unet(TINY, seed=1), scheduler=DDPMScheduler(**SCHEDULER)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return DiffusionPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def torch_pipe(folder):
    return DDPMPipeline.from_pretrained(folder)


def replay_noise(scheduler, steps, batch, seed, every_step):
    """The latents and per-step noise a diffusers pipeline draws from Generator().manual_seed(seed)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, TINY.get("in_channels", 3), TINY["sample_size"], TINY["sample_size"])
    latents = torch.randn(shape, generator=generator)
    scheduler.set_timesteps(steps)
    noise = []
    for t in scheduler.timesteps:
        draws = every_step or int(t) > 0  # DDPMScheduler draws only when t > 0
        noise.append(torch.randn(shape, generator=generator) if draws else torch.zeros(shape))
    return nhwc(latents.numpy()), nhwc(torch.stack(noise).numpy())


def test_ddpm_pipeline_matches_diffusers(pipe, torch_pipe):
    steps = 30
    ref = torch_pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    latents, noise = replay_noise(DDPMScheduler.from_config(torch_pipe.scheduler.config), steps, 2, 0, False)
    images = pipe(num_inference_steps=steps, latents=latents, noise=noise)  # the folder's DDPMScheduler
    err = np.abs(images - ref).max()
    print(f"\nDDPM {steps} steps: largest pixel error {err:.2e}")
    assert images.dtype == np.float32 and images.shape == ref.shape == (2, 16, 16, 3)
    assert err < PIXEL_TOLERANCE


def test_ddim_pipeline_matches_diffusers(pipe, torch_pipe):
    steps, eta = 25, 0.5
    scheduler = DDIMScheduler.from_config(torch_pipe.scheduler.config)
    ref = DDIMPipeline(unet=torch_pipe.unet, scheduler=scheduler)(
        batch_size=2, num_inference_steps=steps, eta=eta, generator=torch.Generator().manual_seed(1),
        output_type="np").images
    latents, noise = replay_noise(DDIMScheduler.from_config(scheduler.config), steps, 2, 1, True)
    images = pipe(num_inference_steps=steps, sampler="ddim", eta=eta, latents=latents, noise=noise)
    err = np.abs(images - ref).max()
    print(f"\nDDIM {steps} steps eta {eta}: largest pixel error {err:.2e}")
    assert err < PIXEL_TOLERANCE


def test_dpm_solver_pipeline_matches_diffusers(pipe, torch_pipe):
    steps = 20
    scheduler = DPMSolverMultistepScheduler.from_config(torch_pipe.scheduler.config)
    ref = DDPMPipeline(unet=torch_pipe.unet, scheduler=scheduler)(
        batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(2), output_type="np").images
    latents, _ = replay_noise(scheduler, steps, 2, 2, False)
    images = pipe(num_inference_steps=steps, sampler="dpmsolver++", latents=latents)
    err = np.abs(images - ref).max()
    print(f"\nDPM-Solver++ {steps} steps: largest pixel error {err:.2e}")
    assert err < PIXEL_TOLERANCE


def test_save_pretrained_round_trip_through_diffusers(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    theirs = {k: v.numpy() for k, v in loaded.unet.state_dict().items()}
    ours = unet_state_dict(pipe.unet)
    assert set(theirs) == set(ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs[name], value, err_msg=name)
    for key, value in SCHEDULER.items():
        assert loaded.scheduler.config[key] == value
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    # and it comes back to us unchanged
    again = DiffusionPipeline.from_pretrained(tmp_path)
    a = pipe(batch_size=2, num_inference_steps=5, sampler="ddim", seed=3)
    b = again(batch_size=2, num_inference_steps=5, sampler="ddim", seed=3)
    np.testing.assert_array_equal(a, b)


def test_seeds_are_reproducible_and_one_program_per_shape(pipe):
    before = sample_program._cache_size()
    a = pipe(batch_size=2, num_inference_steps=10, sampler="ddpm", seed=7)
    b = pipe(batch_size=2, num_inference_steps=10, sampler="ddpm", key=jax.random.key(7))
    c = pipe(batch_size=2, num_inference_steps=10, sampler="ddpm", seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05
    assert sample_program._cache_size() == before + 1
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("batch", [4, 3])  # over the 4 devices, and on one device
def test_a_mesh_set_by_the_caller_changes_nothing(pipe, batch):
    """Called inside `with jax.set_mesh(...)` (jax.make_mesh's Explicit axes, as JAX's sharding
    guide sets them up), the pipeline still samples on its own mesh: the same images as without."""
    want = pipe(batch_size=batch, num_inference_steps=4, sampler="ddpm", seed=5)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with set_mesh(mesh):
        got = pipe(batch_size=batch, num_inference_steps=4, sampler="ddpm", seed=5)
    np.testing.assert_array_equal(got, want)


def test_default_steps_and_samplers(pipe):
    assert pipe.plan().num_steps == 1000  # DDPMPipeline's default
    assert pipe.plan("ddim").num_steps == 50
    assert pipe.plan("dpmsolver++").kind == "dpmsolver++"
    assert pipe.plan("sde-dpmsolver++").kind == "sde-dpmsolver++"


def test_not_a_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        DiffusionPipeline.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        DiffusionPipeline.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="does not exist, and is not a Hub repo id"):
        DiffusionPipeline.from_pretrained(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not be downloaded from the Hugging Face Hub"):
        DiffusionPipeline.from_pretrained("nobody-here/no-such-model")


def test_bad_call_arguments(pipe):
    with pytest.raises(ValueError, match="sampler 'heun'"):
        pipe(sampler="heun")
    with pytest.raises(ValueError, match="latents must be NHWC of shape"):
        pipe(latents=np.zeros((1, 3, 16, 16), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="either seed or key"):
        pipe(seed=1, key=jax.random.key(1), num_inference_steps=2)
    with pytest.raises(ValueError, match="use_clipped_model_output applies to the ddim sampler, not ddpm"):
        pipe(sampler="ddpm", use_clipped_model_output=True, num_inference_steps=2)
