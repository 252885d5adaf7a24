"""DiffusionPipeline: a diffusers DDPMPipeline folder in JAX, loaded, sampled and saved.

A folder is `model_index.json`, `unet/` (config.json + diffusion_pytorch_model.safetensors) and
`scheduler/scheduler_config.json`, exactly what `diffusers.DDPMPipeline.save_pretrained` writes
and `from_pretrained` reads. Sampling is one jitted program (the UNet inside a `lax.scan`).
"""

from __future__ import annotations

import dataclasses
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
from .hub import MODEL_INDEX, SCHEDULER_CONFIG, resolve_pipeline_folder
from .images import to_unit_range
from .unet import DIFFUSERS_VERSION, UNet2D

CLASS_LABELS_KEY = "_class_labels"  # in model_index.json; diffusers ignores keys that start with "_"
PIPELINE_FOR_SCHEDULER = {"DDIMScheduler": "DDIMPipeline"}


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """What a class-conditional pipeline's labels mean: their names (label i is names[i]) and the
    null label that stands for "no class" (what classifier-free guidance steers away from; None
    when the model was trained without class dropout, so it cannot be guided)."""

    names: tuple[str, ...]
    null_label: int | None = None

    def to_json(self) -> dict:
        return {"names": list(self.names), "null_label": self.null_label}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ClassLabels":
        return cls(tuple(str(n) for n in data["names"]), data.get("null_label"))

    def label_of(self, value) -> int:
        """An int label, from an int or a class name; out of range is an error naming the classes
        (with no names known, any integer is a label)."""
        if not self.names:
            return int(value)
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if value not in self.names:
                raise ValueError(f"unknown class {value!r}: the classes are {', '.join(self.names)}")
            return self.names.index(value)
        label = int(value)
        if not 0 <= label < len(self.names):
            raise ValueError(f"class label {label} is out of range: this model has classes 0..{len(self.names) - 1} "
                             f"({', '.join(self.names)})")
        return label


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassCondition:
    """The labels a class-conditional UNet samples with, and optionally classifier-free guidance."""

    labels: jax.Array  # (B,) int32
    null_labels: jax.Array | None = None  # (B,) int32, the null class; with guidance only
    guidance_scale: jax.Array | None = None  # float32 scalar: 0 = the null class, 1 = plain conditional


def denoiser(unet: UNet2D, condition: ClassCondition | None):
    """The model_fn(x, t) the sampling loop calls: the UNet, given its class labels; with a guidance
    scale s, classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + s (cond - uncond), both
    halves from one UNet call on the doubled batch. A learned variance keeps the conditional one."""
    if condition is None:
        return unet
    if condition.guidance_scale is None:
        return lambda x, t: unet(x, t, class_labels=condition.labels)

    def guided(x, t):
        both = unet(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    class_labels=jnp.concatenate([condition.labels, condition.null_labels]))
        cond, uncond = jnp.split(both, 2)
        channels = x.shape[-1]
        mean = uncond[..., :channels] + condition.guidance_scale * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([mean, cond[..., channels:]], axis=-1)
    return guided


@functools.partial(jax.jit, static_argnums=0)
def sample_program(graphdef, state, plan, latents, noise, key, condition=None):
    """The compiled sampling program: the UNet (graphdef, weights) inside one `lax.scan` over the plan.

    It compiles once per (graphdef, batch shape, step count, plan options, kind of conditioning):
    the labels and the guidance scale are arrays, so other labels or scales reuse it. The training
    loop's sample grids and `DiffusionPipeline.__call__` share it.
    """
    unet = nnx.merge(graphdef, state)
    return samplers_lib.sample_loop(denoiser(unet, condition), plan, latents, noise, key)


def spread_over_devices(state, plan, latents, noise, key=None, condition=None):
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
    if condition is not None:
        per_image = batch_sharding(mesh, 0, condition.labels.ndim)
        condition = ClassCondition(jax.device_put(condition.labels, per_image),
                                   None if condition.null_labels is None else
                                   jax.device_put(condition.null_labels, per_image),
                                   None if condition.guidance_scale is None else
                                   jax.device_put(condition.guidance_scale, replicated(mesh)))
    return mesh, (state, plan, latents, noise, key, condition)


class DiffusionPipeline:
    """An image diffusion pipeline: a Flax UNet2D and a diffusers scheduler config; for a
    class-conditional UNet, what its labels mean (`class_labels`)."""

    def __init__(self, unet: UNet2D, scheduler_config: Mapping[str, Any] | None = None,
                 class_labels: ClassLabels | None = None):
        self.unet = unet
        if unet.config.class_conditional and class_labels is None:  # a diffusers folder: labels are indices
            class_labels = ClassLabels(tuple(str(i) for i in range(unet.config.num_class_embeds or 0)))
        self.class_labels = class_labels if unet.config.class_conditional else None
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
        index = json.loads((folder / MODEL_INDEX).read_text()) if (folder / MODEL_INDEX).is_file() else {}
        labels = ClassLabels.from_json(index[CLASS_LABELS_KEY]) if CLASS_LABELS_KEY in index else None
        return cls(load_unet(folder / "unet", dtype=dtype), scheduler_config, labels)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a folder that `diffusers.DDPMPipeline.from_pretrained` (PyTorch) loads."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_unet(self.unet, folder / "unet")
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler_class = self.scheduler_config.get("_class_name", "DDPMScheduler")
        scheduler = {"_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION,
                     **{k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}}
        if "_use_default_values" in self.scheduler_config:  # diffusers keeps it: it steers from_config
            scheduler["_use_default_values"] = list(self.scheduler_config["_use_default_values"])
        write_atomic(folder / "scheduler" / SCHEDULER_CONFIG, json.dumps(scheduler, indent=2) + "\n")
        index = {"_class_name": PIPELINE_FOR_SCHEDULER.get(scheduler_class, "DDPMPipeline"),
                 "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", "UNet2DModel"]}
        if self.class_labels is not None:
            index[CLASS_LABELS_KEY] = self.class_labels.to_json()
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
                 class_labels=None, guidance_scale: float | None = None, output_type: str = "np"):
        """Sample images: float32 NHWC in [0, 1], as diffusers' `output_type="np"`.

        sampler: "ddpm" | "ddim" | "dpmsolver++" | "sde-dpmsolver++"; None = the folder's scheduler.
        num_inference_steps: default 1000 for DDPM (as DDPMPipeline), 50 for the others.
        seed / key: the randomness; latents come from fold_in(key, 0), per-step noise from fold_in(key, 1).
        latents: optional initial noise (B, H, W, C); noise: optional per-step noise (steps, B, H, W, C).
        class_labels: for a class-conditional model, one label (int or class name) per image; the
            batch size is their number. guidance_scale: classifier-free guidance (0: the null class,
            1: plain conditional, above 1: more of the class); None: plain conditional.
        output_type: "np" (images in [0, 1]) or "latent" (the raw final sample, NHWC).
        """
        plan = self.plan(sampler, num_inference_steps, eta, use_clipped_model_output)
        if class_labels is not None and latents is None and batch_size == 1:
            batch_size = len(class_labels)
        condition = self.condition(class_labels, guidance_scale,
                                   batch_size if latents is None else np.shape(latents)[0])
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
        mesh, (state, plan, latents, noise, key, condition) = spread_over_devices(
            state, plan, latents, noise, jax.random.fold_in(key, 1), condition)
        with set_mesh(mesh):  # ours, also when the caller has set a mesh of their own
            final = sample_program(graphdef, state, plan, latents, noise, key, condition)
        final = np.asarray(final)
        if output_type == "latent":
            return final
        if output_type != "np":
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        return to_unit_range(final)

    def condition(self, class_labels, guidance_scale: float | None, batch_size: int) -> ClassCondition | None:
        """The ClassCondition of a call, checked: labels exactly for a conditional model, one per
        image, in range; guidance only where the model has a null class."""
        if self.class_labels is None:
            if class_labels is not None or guidance_scale is not None:
                raise ValueError("this model is unconditional: it takes no class_labels or guidance_scale")
            return None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels, one per image (classes "
                             f"{', '.join(self.class_labels.names)})")
        if self.unet.config.class_embed_type == "identity":  # the labels are class embeddings already
            if guidance_scale is not None:
                raise ValueError("class_embed_type identity takes embeddings as labels; guidance needs a null class")
            return ClassCondition(jnp.asarray(class_labels, jnp.float32))
        labels = np.array([self.class_labels.label_of(v) for v in np.atleast_1d(np.asarray(class_labels, object))],
                          np.int32)
        if len(labels) != batch_size:
            raise ValueError(f"{len(labels)} class_labels for a batch of {batch_size}: give one label per image")
        if guidance_scale is None:
            return ClassCondition(jnp.asarray(labels))
        if self.class_labels.null_label is None:
            raise ValueError("classifier-free guidance needs a model trained with a null class (train.py "
                             "--class_dropout_prob > 0); this one has none: sample with guidance_scale=None")
        null = jnp.full(labels.shape, self.class_labels.null_label, jnp.int32)
        return ClassCondition(jnp.asarray(labels), null, jnp.asarray(guidance_scale, jnp.float32))

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
