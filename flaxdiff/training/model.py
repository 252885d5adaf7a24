"""What a run trains: the UNet config (a preset or a diffusers config.json), the noise schedule,
and the model built from them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..diffusers_io import load_unet
from ..hub import SCHEDULER_CONFIG, resolve_pipeline_folder
from ..samplers import DDPMSampler
from ..unet import UNet2D, UNet2DConfig
from .options import PRESETS, OptionsError, TrainOptions


def unet_config_for(opts: TrainOptions, num_classes: int | None = None):
    """The UNet2DConfig to train: a preset at --resolution, a diffusers config file, or a pretrained
    model's; with --class_conditional, one class embedding per class and one for the null class
    (`null_label`)."""
    if opts.pretrained_model_name_or_path:
        path = resolve_pipeline_folder(opts.pretrained_model_name_or_path) / "unet" / "config.json"
        try:
            config = UNet2DConfig.from_json_file(path)
        except ValueError as error:
            raise OptionsError(f"--pretrained_model_name_or_path {opts.pretrained_model_name_or_path}: {error}") \
                from error
    elif opts.model_config_name_or_path:
        path = Path(opts.model_config_name_or_path).expanduser()
        for candidate in (path, path / "config.json", path / "unet" / "config.json"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise OptionsError(f"--model_config_name_or_path {opts.model_config_name_or_path}: no config.json "
                               "there (give a UNet2DModel config.json, its folder, or a pipeline folder)")
        try:
            config = UNet2DConfig.from_json_file(path)
        except (ValueError, json.JSONDecodeError) as error:
            raise OptionsError(f"{path}: {error}") from error
        size = config.image_size
        if size is not None and size != (opts.resolution, opts.resolution):
            raise OptionsError(f"--resolution {opts.resolution} but {path} has sample_size {config.sample_size}: "
                               f"pass --resolution {size[0]} or change the config")
        if size is None:
            config = dataclasses.replace(config, sample_size=opts.resolution)
    else:
        config = UNet2DConfig(sample_size=opts.resolution, in_channels=opts.num_channels,
                              out_channels=opts.num_channels, **PRESETS[opts.model_preset])
    factor = config.downsampling_factor
    if opts.resolution % factor:
        raise OptionsError(f"--resolution {opts.resolution} is not a multiple of {factor}, which this UNet "
                           f"({len(config.block_out_channels)} levels) needs")
    if config.in_channels not in (1, 3):
        raise OptionsError(f"the UNet takes {config.in_channels} input channels; train.py feeds images with 1 or 3")
    if config.out_channels != config.in_channels:
        raise OptionsError(f"the UNet has in_channels {config.in_channels} but out_channels {config.out_channels}; "
                           "train.py trains models that predict an image-shaped output")
    return with_class_embedding(config, opts, num_classes)


def class_embeds_needed(opts: TrainOptions, num_classes: int) -> int:
    """One embedding per class, and one for the null class when labels are dropped (guidance)."""
    return num_classes + (1 if opts.class_dropout_prob > 0 else 0)


def null_label(opts: TrainOptions, num_classes: int) -> int | None:
    """The label that stands for "no class": the one after the last class, when there is one."""
    return num_classes if opts.class_dropout_prob > 0 else None


def with_class_embedding(config: UNet2DConfig, opts: TrainOptions, num_classes: int | None) -> UNet2DConfig:
    """The config with the class embedding --class_conditional needs, checked against the data's classes."""
    if not opts.class_conditional:
        if config.class_conditional:
            raise OptionsError(f"the UNet config is class-conditional (num_class_embeds {config.num_class_embeds}, "
                               f"class_embed_type {config.class_embed_type}): add --class_conditional, or use an "
                               "unconditional config")
        return config
    wanted = class_embeds_needed(opts, num_classes)
    if config.class_embed_type == "identity":
        raise OptionsError("class_embed_type 'identity' takes class embeddings, not labels: train.py trains a table "
                           "(num_class_embeds) or class_embed_type 'timestep'")
    if config.class_embed_type == "timestep" or config.num_class_embeds == wanted:
        return config
    if config.num_class_embeds is None:
        return dataclasses.replace(config, num_class_embeds=wanted)
    raise OptionsError(f"the UNet config has num_class_embeds {config.num_class_embeds}, but the data has "
                       f"{num_classes} classes" + (" plus the null class of --class_dropout_prob"
                                                    if opts.class_dropout_prob > 0 else "")
                       + f": it needs num_class_embeds {wanted}")


def scheduler_config_for(opts: TrainOptions) -> dict:
    """The DDPMScheduler config train_unconditional builds, as diffusers saves it in scheduler/: with
    `_use_default_values`, the settings left at DDPMScheduler's defaults, which another scheduler
    built from the folder (DDIMScheduler.from_config, DPMSolverMultistepScheduler.from_config) takes
    from its own defaults instead (DPM-Solver's linspace spacing, for one). A pretrained model's own
    scheduler config as it is (all its settings: betas, variance type, clipping)."""
    if opts.pretrained_model_name_or_path:
        folder = resolve_pipeline_folder(opts.pretrained_model_name_or_path)
        return json.loads((folder / "scheduler" / SCHEDULER_CONFIG).read_text())
    given = dict(num_train_timesteps=opts.ddpm_num_steps, beta_schedule=opts.ddpm_beta_schedule,
                 prediction_type=opts.prediction_type)
    defaults = DDPMSampler()
    for name in ("rescale_betas_zero_snr", "timestep_spacing"):  # passed only when the flags change them
        if getattr(opts, name) != getattr(defaults, name):
            given[name] = getattr(opts, name)
    config = DDPMSampler(**given).to_config()
    config["_use_default_values"] = sorted(k for k in config if not k.startswith("_") and k not in given)
    return config


@dataclasses.dataclass(frozen=True)
class Model:
    """The UNet to train, split for the compiled step: its graph and its float32 weights.

    `sample_graphdef` is the float32 graph without rematerialisation, used to sample and save
    whatever the training compute dtype (--mixed_precision) and --gradient_checkpointing are.
    """

    config: UNet2DConfig
    graphdef: nnx.GraphDef
    params: dict
    sample_graphdef: nnx.GraphDef

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def build_model(config: UNet2DConfig, opts: TrainOptions) -> Model:
    """The UNet with PyTorch's initialisation drawn from --seed, or the pretrained model's weights."""
    dtype = jnp.bfloat16 if opts.mixed_precision == "bf16" else jnp.float32
    if opts.pretrained_model_name_or_path:
        folder = resolve_pipeline_folder(opts.pretrained_model_name_or_path) / "unet"
        unet = load_unet(folder, dtype=dtype, gradient_checkpointing=opts.gradient_checkpointing, config=config)
    else:
        unet = UNet2D(config, rngs=nnx.Rngs(opts.seed), dtype=dtype,
                      gradient_checkpointing=opts.gradient_checkpointing)
    graphdef, params = nnx.split(unet)
    plain = dtype == jnp.float32 and not opts.gradient_checkpointing
    sample_graphdef = graphdef if plain else nnx.graphdef(UNet2D(config, rngs=nnx.Rngs(0)))
    return Model(config, graphdef, nnx.to_pure_dict(params), sample_graphdef)
