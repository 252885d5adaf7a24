"""DiffusionPipeline: a diffusers DDPMPipeline folder in JAX, loaded, sampled and saved.

A folder is `model_index.json`, `unet/` (config.json + diffusion_pytorch_model.safetensors) and
`scheduler/scheduler_config.json`, exactly what `diffusers.DDPMPipeline.save_pretrained` writes
and `from_pretrained` reads. Sampling is one jitted program (the UNet inside a `lax.scan`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import samplers as samplers_lib
from .compat import set_mesh
from .diffusers_io import load_unet, save_unet, write_atomic
from .images import to_unit_range
from .unet import DIFFUSERS_VERSION, UNet2D

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_FOR_SCHEDULER = {"DDIMScheduler": "DDIMPipeline"}


def is_pipeline_folder(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file() or ((path / "unet").is_dir() and (path / "scheduler").is_dir())


def resolve_pipeline_folder(path: str | os.PathLike) -> Path:
    """A local pipeline folder, or a Hub repo id downloaded to the local cache."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not is_pipeline_folder(local):
            raise ValueError(f"{local} is not a diffusers pipeline folder: expected {MODEL_INDEX}, unet/ and "
                             "scheduler/ in it (as DDPMPipeline.save_pretrained or train.py writes)")
        return local
    if str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise ValueError(f"{path} does not exist, and is not a Hub repo id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path), allow_patterns=["model_index.json", "unet/*", "scheduler/*"]))
    except Exception as error:  # network, authentication, missing repo: all end here
        raise ValueError(f"{path} is not a local folder and could not be downloaded from the Hugging Face Hub "
                         f"({type(error).__name__}: {error}). Check the id, your network, or pass a local "
                         "folder.") from error


@functools.partial(jax.jit, static_argnums=0)
def sample_program(graphdef, state, plan, latents, noise, key):
    """The compiled sampling program: the UNet (graphdef, weights) inside one `lax.scan` over the plan.

    It compiles once per (graphdef, batch shape, step count, plan options); the training loop's
    sample grids and `DiffusionPipeline.__call__` share it.
    """
    unet = nnx.merge(graphdef, state)
    return samplers_lib.sample_loop(unet, plan, latents, noise, key)


def spread_over_devices(state, plan, latents, noise, key=None):
    """Split the batch over this process's devices (weights replicated) when it divides evenly,
    else put everything on the first device; returns the mesh used, under which the sampling
    program must run (`compat.set_mesh`), whatever mesh the caller has set.

    The random draws do not depend on the split (threefry is partitionable), so a seed gives the
    same images on 1 or N devices.
    """
    from .parallel import batch_sharding, make_mesh, replicated

    devices = jax.local_devices()
    if latents.shape[0] % len(devices):
        devices = devices[:1]
    mesh = make_mesh(devices)
    state, plan, key = jax.device_put((state, plan, key), replicated(mesh))
    latents = jax.device_put(latents, batch_sharding(mesh, 0, latents.ndim))
    if noise is not None:
        noise = jax.device_put(jnp.asarray(noise, jnp.float32), batch_sharding(mesh, 1, 5))
    return mesh, (state, plan, latents, noise, key)


class DiffusionPipeline:
    """An unconditional image diffusion pipeline: a Flax UNet2D and a diffusers scheduler config."""

    def __init__(self, unet: UNet2D, scheduler_config: Mapping[str, Any] | None = None):
        self.unet = unet
        config = dict(scheduler_config or {"_class_name": "DDPMScheduler"})
        config.setdefault("_class_name", "DDPMScheduler")
        # validate now: a bad scheduler config fails at load, not at the first sample
        samplers_lib.make_sampler(None, config)
        self.scheduler_config = config

    # ----------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32) -> "DiffusionPipeline":
        """Load a diffusers DDPMPipeline/DDIMPipeline folder, a train.py output_dir, or a Hub id."""
        folder = resolve_pipeline_folder(path)
        scheduler_file = folder / "scheduler" / SCHEDULER_CONFIG
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"no scheduler/{SCHEDULER_CONFIG} in {folder}")
        scheduler_config = json.loads(scheduler_file.read_text())
        return cls(load_unet(folder / "unet", dtype=dtype), scheduler_config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a folder that `diffusers.DDPMPipeline.from_pretrained` (PyTorch) loads."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_unet(self.unet, folder / "unet")
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler_class = self.scheduler_config.get("_class_name", "DDPMScheduler")
        scheduler = {"_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION,
                     **{k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}}
        write_atomic(folder / "scheduler" / SCHEDULER_CONFIG, json.dumps(scheduler, indent=2) + "\n")
        index = {"_class_name": PIPELINE_FOR_SCHEDULER.get(scheduler_class, "DDPMPipeline"),
                 "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", "UNet2DModel"]}
        write_atomic(folder / MODEL_INDEX, json.dumps(index, indent=2) + "\n")

    # ----------------------------------------------------------------------- sampling
    def make_sampler(self, sampler: str | None = None):
        """The folder's scheduler as a flaxdiff sampler, or another one built from its config
        (diffusers' `OtherScheduler.from_config(pipe.scheduler.config)`)."""
        return samplers_lib.make_sampler(sampler, self.scheduler_config)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.unet.config.image_size
        if size is None:
            raise ValueError("the UNet config has no sample_size: pass `latents` of shape (B, H, W, C)")
        return (batch_size, size[0], size[1], self.unet.config.in_channels)

    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, sampler: str | None = None,
                 eta: float = 0.0, seed: int | None = None, key: jax.Array | None = None,
                 latents=None, noise=None, use_clipped_model_output: bool = False,
                 output_type: str = "np"):
        """Sample images: float32 NHWC in [0, 1], as diffusers' `output_type="np"`.

        sampler: "ddpm" | "ddim" | "dpmsolver++" | "sde-dpmsolver++"; None = the folder's scheduler.
        num_inference_steps: default 1000 for DDPM (as DDPMPipeline), 50 for the others.
        seed / key: the randomness; latents come from fold_in(key, 0), per-step noise from fold_in(key, 1).
        latents: optional initial noise (B, H, W, C); noise: optional per-step noise (steps, B, H, W, C).
        output_type: "np" (images in [0, 1]) or "latent" (the raw final sample, NHWC).
        """
        plan = self.plan(sampler, num_inference_steps, eta, use_clipped_model_output)
        if key is None:
            key = jax.random.key(0 if seed is None else seed)
        elif seed is not None:
            raise ValueError("pass either seed or key, not both")
        if latents is None:
            latents = jax.random.normal(jax.random.fold_in(key, 0), self.latent_shape(batch_size), jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        expected = self.latent_shape(latents.shape[0]) if self.unet.config.image_size else None
        if latents.ndim != 4 or (expected and latents.shape != expected):
            raise ValueError(f"latents must be NHWC of shape {expected or '(B, H, W, C)'}, got {latents.shape}")
        if noise is not None and not plan.options.stochastic:
            noise = None  # deterministic samplers use no noise, as in diffusers
        graphdef, state = nnx.split(self.unet)
        mesh, (state, plan, latents, noise, key) = spread_over_devices(state, plan, latents, noise,
                                                                       jax.random.fold_in(key, 1))
        with set_mesh(mesh):  # ours, also when the caller has set a mesh of their own
            final = sample_program(graphdef, state, plan, latents, noise, key)
        final = np.asarray(final)
        if output_type == "latent":
            return final
        if output_type != "np":
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        return to_unit_range(final)

    def plan(self, sampler: str | None = None, num_inference_steps: int | None = None, eta: float = 0.0,
             use_clipped_model_output: bool = False) -> samplers_lib.Plan:
        chosen = self.make_sampler(sampler)
        if num_inference_steps is None:
            num_inference_steps = chosen.default_num_inference_steps()
        if use_clipped_model_output:
            if chosen.kind != "ddim":
                raise ValueError(f"use_clipped_model_output applies to the ddim sampler, not {chosen.kind}")
            return chosen.plan(num_inference_steps, eta=eta, use_clipped_model_output=True)
        return chosen.plan(num_inference_steps, eta=eta)
