"""The training job's options: diffusers' `train_unconditional.py` flags, presets, checks.

Every flag is a field of `TrainOptions` with its help text, group and choices; `build_parser`
turns them into argparse flags, so a flag is defined once. No JAX here: `train.py --help` and
the option checks run before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..choices import (BETA_SCHEDULES, DATASET_ON_DEVICE, LOGGERS, LR_SCHEDULERS, MIXED_PRECISION, ON_BAD_IMAGE,
                       PREDICTION_TYPES, SAMPLER_NAMES, TIMESTEP_SPACINGS)
from ..data import BUILTIN
from ..hub import SCHEDULER_CONFIG, default_repo_name, resolve_pipeline_folder

PRESETS: dict[str, dict] = {
    # small enough for a CPU: trains on the built-in shapes in minutes
    "tiny": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # the model of Unit 1 of the Hugging Face diffusion course
    "course": dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2,
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # diffusers train_unconditional.py's default
    "ddpm": dict(block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
}
# Defaults that differ between real datasets (diffusers' train_unconditional values, except the
# fast DDIM grids) and the built-in dataset, whose defaults make `python train.py` a CPU demo
# that shows clear shapes in under 10 minutes. Every one of them is a flag.
PROFILE_DEFAULTS = {
    "model_preset": ("course", "tiny"),
    "train_batch_size": (16, 8),
    "num_epochs": (100, 10),
    "learning_rate": (1e-4, 1e-3),
    "lr_warmup_steps": (500, 100),
    "use_ema": (False, True),
    "sampler": ("ddim", "ddpm"),
    "num_inference_steps": (50, 100),
    "timestep_spacing": ("leading", "trailing"),
}
# ... and with --class_conditional on the built-in dataset: 4x the images, so that the few-minute
# demo's model uses its labels (benchmarks/class_conditional_shapes.py: 92% of samples the kind
# asked for at guidance 3, against 46% with the unconditional demo's budget; docs/conditional.md).
BUILTIN_CONDITIONAL_DEFAULTS = {"train_batch_size": 32, "num_epochs": 40}
# Model defaults that a pretrained model's configs replace (--pretrained_model_name_or_path).
MODEL_DEFAULTS = {"resolution": 32, "num_channels": 3, "prediction_type": "epsilon", "ddpm_num_steps": 1000,
                  "ddpm_beta_schedule": "linear"}
# ... except on the built-in dataset, whose few-minute model samples well with every sampler only
# with these (benchmarks/default_recipe.py: a shape classifier recognises 69-73% of its DDPM, DDIM
# and DPM-Solver++ samples, against 37-54% with epsilon and the linear schedule; docs/recipes.md).
BUILTIN_MODEL_DEFAULTS = {"prediction_type": "v_prediction", "ddpm_beta_schedule": "squaredcos_cap_v2"}


def _opt(default, help, **kwargs):
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass
class TrainOptions:
    # ------------------------------------------------------------------ data
    dataset: str | None = _opt(None, f"what to train on: '{BUILTIN}' (generated, offline; the default), "
                               "'smithsonian_butterflies' (the course's), a Hub dataset id, or a local image folder",
                               group="data")
    dataset_name: str | None = _opt(None, "diffusers' name for --dataset (a Hub id or local dataset)", group="data")
    train_data_dir: str | None = _opt(None, "diffusers' name for --dataset with a local image folder", group="data")
    dataset_config_name: str | None = _opt(None, "the Hub dataset's config, if it has several", group="data")
    split: str = _opt("train", "the dataset split to train on", group="data")
    image_column: str | None = _opt(None, "the column holding the images (default: the first image column)",
                                    group="data")
    cache_dir: str | None = _opt(None, "where Hugging Face datasets caches downloads", group="data")
    image_cache_dir: str | None = _opt(None, "where the decoded images are kept, memory-mapped, for later runs and "
                                       "resumes (default ~/.cache/flaxdiff/images or $FLAXDIFF_IMAGE_CACHE; 'none': "
                                       "decode into memory each time)", group="data")
    dataloader_num_workers: int | None = _opt(None, "processes that decode the images the first time (default: "
                                              "one per core, up to 8; 0: this process)", group="data")
    on_bad_image: str = _opt("error", "an unreadable image stops the run with its name, or is left out and counted",
                             group="data", choices=ON_BAD_IMAGE)
    streaming: bool = _opt(False, "read a Hub dataset or an image folder as a stream (datasets' streaming): for "
                           "data larger than the disk; needs --max_train_steps; the stream's position is kept in "
                           "checkpoints", group="data")
    shuffle_buffer_size: int = _opt(1000, "with --streaming: images in the shuffle buffer (0: the stream's own "
                                    "order, which a resume continues exactly)", group="data")
    prefetch_batches: int = _opt(2, "batches prepared ahead of the step by a host thread (more: smoother when "
                                 "reading is uneven, at the cost of host memory)", group="data")
    max_train_samples: int | None = _opt(None, "use only the first N images", group="data")
    num_shapes: int = _opt(2048, f"how many images the built-in '{BUILTIN}' dataset has", group="data")
    resolution: int | None = _opt(None, "image size: shorter side resized to this (bilinear), then cropped "
                                  "square (default 32; a pretrained model's sample_size)", group="data")
    center_crop: bool = _opt(False, "crop the centre (default: a random crop, fixed per image by --seed)",
                             group="data")
    random_flip: bool = _opt(False, "flip images horizontally at random (on the device, every step)", group="data")
    validation_split: str | None = _opt(None, "held-out images for the validation bits/dim: a split of the dataset "
                                        "(the built-in shapes have 'test'), or a fraction of the training images "
                                        "kept out of training (e.g. 0.05)", group="data")
    validation_steps: int | None = _opt(None, "with --validation_split: held-out bits/dim of the EMA and the "
                                        "training weights every N optimizer steps (default: at every epoch's end)",
                                        group="data")
    validation_num_images: int = _opt(256, "held-out images in each validation (the first N of the split)",
                                      group="data")
    validation_num_timesteps: int = _opt(10, "Monte-Carlo timesteps per image in each validation; the timesteps "
                                         "and noise are drawn once, so successive values compare", group="data")
    # ------------------------------------------------------------------ model and noise
    pretrained_model_name_or_path: str | None = _opt(None, "fine-tune: a diffusers pipeline folder, a train.py "
                                                     "output_dir or a Hub id; its UNet weights and config and its "
                                                     "scheduler config are the start (the optimizer starts fresh, "
                                                     "the EMA from the pretrained weights)", group="model")
    model_preset: str | None = _opt(None, "UNet preset: tiny (CPU demos), course (Unit 1's), ddpm "
                                    "(train_unconditional's); default tiny for the built-in dataset, course otherwise",
                                    group="model", choices=tuple(PRESETS))
    model_config_name_or_path: str | None = _opt(None, "a diffusers UNet2DModel config.json (or a folder with "
                                                 "one, or a pipeline folder with unet/) instead of a preset",
                                                 group="model")
    num_channels: int | None = _opt(None, "image channels for presets: 3 (RGB) or 1 (grayscale) (default 3)",
                                    group="model", choices=(1, 3))
    prediction_type: str | None = _opt(None, "what the model predicts (default epsilon; v_prediction for the "
                                       "built-in dataset; a pretrained model's)",
                                       group="model", choices=PREDICTION_TYPES)
    ddpm_num_steps: int | None = _opt(None, "number of diffusion timesteps T (default 1000; a pretrained model's)",
                                      group="model")
    ddpm_beta_schedule: str | None = _opt(None, "noise schedule (default linear; squaredcos_cap_v2 for the "
                                          "built-in dataset; a pretrained model's)",
                                          group="model", choices=BETA_SCHEDULES)
    rescale_betas_zero_snr: bool = _opt(False, "rescale the betas to zero terminal SNR (Lin et al. 2024), so the "
                                        "last timestep is pure noise as sampling assumes; use with v_prediction",
                                        group="model")
    timestep_spacing: str | None = _opt(None, "how samplers space their timesteps (diffusers' scheduler option; "
                                        "trailing starts sampling at the last timestep) (default leading; "
                                        "trailing for the built-in dataset)", group="model",
                                 choices=TIMESTEP_SPACINGS)
    class_conditional: bool = _opt(False, "train on class labels (UNet2DModel's num_class_embeds: one embedding per "
                                   "class and one for the null class); the labels come from the dataset's ClassLabel "
                                   "column, an image folder's sub-folders or an .npz's 'labels'", group="model")
    class_column: str | None = _opt(None, "the column holding the class labels (default: the first ClassLabel "
                                    "column)", group="model")
    class_dropout_prob: float = _opt(0.1, "with --class_conditional: the share of training labels replaced by the "
                                     "null class, so the model also learns unconditional samples and can be "
                                     "sampled with classifier-free guidance (0: no null class)", group="model")
    # ------------------------------------------------------------------ optimisation
    train_batch_size: int | None = _opt(None, "global batch size per optimizer step, split over all devices "
                                        "(default 16; 8 for the built-in dataset, 32 with --class_conditional)", group="optim")
    gradient_accumulation_steps: int = _opt(1, "micro-batches of --train_batch_size per optimizer step",
                                            group="optim")
    num_epochs: int | None = _opt(None, "epochs to train (default 100; 10 for the built-in dataset, 40 with "
                                  "--class_conditional)", group="optim")
    max_train_steps: int | None = _opt(None, "optimizer steps to train; overrides --num_epochs", group="optim")
    learning_rate: float | None = _opt(None, "peak learning rate (default 1e-4; 1e-3 for the built-in dataset)",
                                       group="optim")
    lr_scheduler: str = _opt("cosine", "learning-rate schedule, counted in optimizer steps", group="optim",
                             choices=LR_SCHEDULERS)
    lr_warmup_steps: int | None = _opt(None, "linear warmup, in optimizer steps (default 500; 100 for the "
                                       "built-in dataset)", group="optim")
    adam_beta1: float = _opt(0.95, "AdamW beta1", group="optim")
    adam_beta2: float = _opt(0.999, "AdamW beta2", group="optim")
    adam_weight_decay: float = _opt(1e-6, "AdamW decoupled weight decay", group="optim")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", group="optim")
    max_grad_norm: float = _opt(1.0, "clip the gradient's global norm to this (0: no clipping)", group="optim")
    use_ema: bool | None = _opt(None, "keep an exponential moving average of the weights, used for samples and "
                                "saving (default off; on for the built-in dataset)",
                         group="optim")
    ema_inv_gamma: float = _opt(1.0, "EMA warmup inverse gamma", group="optim")
    ema_power: float = _opt(0.75, "EMA warmup power", group="optim")
    ema_max_decay: float = _opt(0.9999, "EMA maximum decay", group="optim")
    mixed_precision: str = _opt("no", "compute dtype: no (float32) or bf16 (bfloat16 compute, float32 weights)",
                                group="optim", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _opt(False, "recompute UNet blocks in the backward pass to save memory "
                                        "(TPUs/GPUs; XLA:CPU schedules the recomputation early, so it saves "
                                        "nothing on CPUs)", group="optim")
    seed: int = _opt(0, "the run's seed: weights, data order, noise and crops all derive from it", group="optim")
    # ------------------------------------------------------------------ outputs
    output_dir: str | None = _opt(None, "where the pipeline, checkpoints, samples and metrics go "
                                  "(default: flaxdiff-<dataset>-<resolution>)", group="output")
    overwrite_output_dir: bool = _opt(False, "start over in an output_dir that holds another run (its checkpoints, "
                                      "samples, logs and pipeline are deleted; other files stay)", group="output")
    eval_batch_size: int = _opt(16, "images in each sample grid", group="output")
    save_images_epochs: int = _opt(10, "save a sample grid every N epochs (and at the end)", group="output")
    save_model_epochs: int = _opt(10, "save the diffusers pipeline every N epochs (and at the end)", group="output")
    sampler: str | None = _opt(None, "sampler for the grids saved while training (default ddim; ddpm for the "
                               "built-in dataset)", group="output", choices=SAMPLER_NAMES)
    num_inference_steps: int | None = _opt(None, "sampling steps for those grids (default 50; 100 for the "
                                           "built-in dataset)", group="output")
    guidance_scale: float = _opt(3.0, "with --class_conditional: the classifier-free guidance of those grids (one "
                                 "row per class; 1: no guidance)", group="output")
    ddpm_num_inference_steps: int | None = _opt(None, "diffusers' name for --num_inference_steps", group="output")
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N optimizer steps (and at the end)",
                                    group="output")
    checkpoints_total_limit: int | None = _opt(None, "keep only the newest N checkpoints", group="output")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint path: continue that run exactly",
                                              group="output")
    logging_steps: int = _opt(10, "log loss, lr and images/s every N steps (the only host syncs)", group="output")
    logger: str = _opt("none", "also log the metrics and sample grids to TensorBoard or Weights & Biases "
                       "(diffusers' --logger; each is an optional extra: pip install \"flaxdiff[tensorboard]\" or "
                       "\"flaxdiff[wandb]\"); metrics.jsonl and the PNGs are written either way", group="output",
                       choices=LOGGERS)
    logging_dir: str = _opt("logs", "the logger's folder, inside output_dir", group="output")
    tracker_project_name: str = _opt("flaxdiff", "the W&B project of --logger wandb", group="output")
    push_to_hub: bool = _opt(False, "upload the final pipeline folder and its model card to the Hugging Face Hub "
                             "(not the checkpoints or logs)", group="output")
    hub_model_id: str | None = _opt(None, "the Hub repo to push to, 'name' or 'user/name' (default: the "
                                    "output_dir's name)", group="output")
    hub_private_repo: bool = _opt(False, "create the Hub repo as private", group="output")
    hub_token: str | None = _opt(None, "Hub token (default: the one `hf auth login` stored, or HF_TOKEN)",
                                 group="output")
    # ------------------------------------------------------------------ scale
    steps_per_dispatch: int = _opt(1, "run K optimizer steps as one lax.scan per dispatch", group="scale")
    dataset_on_device: str = _opt("auto", "keep the uint8 dataset in device memory and gather batches in the "
                                  "train step: auto (on TPUs/GPUs when it takes at most 1/4 of a device's "
                                  "memory; never on CPUs, whose devices share host memory), yes, or no "
                                  "(batches gathered on the host and prefetched)",
                                  group="scale", choices=DATASET_ON_DEVICE)
    coordinator_address: str | None = _opt(None, "multi-host: HOST:PORT of process 0 (not needed on TPU pods "
                                           "or SLURM, which JAX detects)", group="scale")
    num_processes: int | None = _opt(None, "multi-host: the number of processes", group="scale")
    process_id: int | None = _opt(None, "multi-host: this process's index", group="scale")


class OptionsError(ValueError):
    """Flags that are wrong or contradict each other; the message names them and the fix."""


def resolve_options(opts: TrainOptions) -> TrainOptions:
    """Aliases and data-dependent defaults filled in; contradictions are an OptionsError."""
    opts = dataclasses.replace(opts)
    opts.dataset = _merge_aliases(opts, ("dataset", "dataset_name", "train_data_dir"), "name different datasets")
    opts.dataset = opts.dataset or BUILTIN
    opts.num_inference_steps = _merge_aliases(opts, ("num_inference_steps", "ddpm_num_inference_steps"),
                                              "differ")
    opts.ddpm_num_inference_steps = None
    builtin = opts.dataset == BUILTIN
    models = [f"--{n}" for n in ("pretrained_model_name_or_path", "model_preset", "model_config_name_or_path")
              if getattr(opts, n)]
    if len(models) > 1:
        raise OptionsError(f"{' and '.join(models)} each name the model to train: give one of them, not both")
    fill_model_defaults(opts, builtin)
    if opts.model_config_name_or_path or opts.pretrained_model_name_or_path:
        opts.model_preset = None
    for name, (usual, demo) in PROFILE_DEFAULTS.items():
        taken = opts.model_config_name_or_path or opts.pretrained_model_name_or_path
        if opts.class_conditional:
            demo = BUILTIN_CONDITIONAL_DEFAULTS.get(name, demo)
        if getattr(opts, name) is None and not (name == "model_preset" and taken):
            setattr(opts, name, demo if builtin else usual)
    if opts.output_dir is None:
        name = Path(opts.dataset.rstrip("/")).name or "data"
        opts.output_dir = f"flaxdiff-{name}-{opts.resolution}"
    if opts.resume_from_checkpoint and opts.overwrite_output_dir:
        raise OptionsError("--resume_from_checkpoint continues the run in output_dir and --overwrite_output_dir "
                           "deletes it: give only one")
    positive = ["resolution", "train_batch_size", "gradient_accumulation_steps", "num_epochs", "eval_batch_size",
                "save_images_epochs", "save_model_epochs", "checkpointing_steps", "logging_steps",
                "steps_per_dispatch", "ddpm_num_steps", "num_shapes"]
    positive += [name for name in ("max_train_steps", "checkpoints_total_limit", "num_inference_steps",
                                   "max_train_samples", "validation_steps") if getattr(opts, name) is not None]
    positive += ["validation_num_images", "validation_num_timesteps", "prefetch_batches"]
    for name in positive:
        if getattr(opts, name) < 1:
            raise OptionsError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.learning_rate <= 0:
        raise OptionsError(f"--learning_rate must be positive, got {opts.learning_rate}")
    if opts.lr_warmup_steps < 0:
        raise OptionsError(f"--lr_warmup_steps must be >= 0, got {opts.lr_warmup_steps}")
    if not 0 <= opts.ema_max_decay <= 1:
        raise OptionsError(f"--ema_max_decay must be in [0, 1], got {opts.ema_max_decay}")
    if opts.streaming:
        if opts.max_train_steps is None:
            raise OptionsError("--streaming needs --max_train_steps: a stream's length is not known in advance")
        if opts.dataset_on_device == "yes":
            raise OptionsError("--streaming and --dataset_on_device yes exclude each other: a stream is read as it "
                               "goes, not kept")
        if opts.validation_split is not None and validation_fraction(opts.validation_split) is not None:
            raise OptionsError("--streaming holds out no fraction of the stream: give --validation_split a split "
                               "name (e.g. test)")
    if opts.validation_steps is not None and opts.validation_split is None:
        raise OptionsError("--validation_steps sets how often --validation_split is scored: add --validation_split "
                           "(e.g. test, or 0.05)")
    if opts.validation_split is not None:
        validation_fraction(opts.validation_split)  # a bad fraction fails here
    if not 0 <= opts.class_dropout_prob < 1:
        raise OptionsError(f"--class_dropout_prob must be in [0, 1), got {opts.class_dropout_prob}")
    if not opts.class_conditional and opts.class_column is not None:
        raise OptionsError("--class_column names the labels of --class_conditional training: add --class_conditional")
    if (opts.hub_model_id or opts.hub_private_repo) and not opts.push_to_hub:
        raise OptionsError("--hub_model_id / --hub_private_repo only apply with --push_to_hub: add it")
    if opts.push_to_hub and opts.hub_model_id is None:
        opts.hub_model_id = default_repo_name(opts.output_dir)
    if opts.num_inference_steps > opts.ddpm_num_steps:
        raise OptionsError(f"--num_inference_steps {opts.num_inference_steps} exceeds --ddpm_num_steps "
                           f"{opts.ddpm_num_steps}")
    return opts


def fill_model_defaults(opts: TrainOptions, builtin: bool) -> None:
    """--resolution, --num_channels and the noise-schedule flags: what was given, else the pretrained
    model's, else MODEL_DEFAULTS (BUILTIN_MODEL_DEFAULTS on the built-in dataset); a given value that
    contradicts the pretrained model is an error."""
    pretrained = pretrained_values(opts.pretrained_model_name_or_path) if opts.pretrained_model_name_or_path else {}
    for name, usual in MODEL_DEFAULTS.items():
        usual = BUILTIN_MODEL_DEFAULTS.get(name, usual) if builtin else usual
        given, theirs = getattr(opts, name), pretrained.get(name)
        if given is not None and theirs is not None and given != theirs:
            raise OptionsError(f"--{name} {given} contradicts the pretrained model "
                               f"{opts.pretrained_model_name_or_path}, which has {theirs}: drop --{name} (or "
                               "fine-tune another model)")
        setattr(opts, name, given if given is not None else theirs if theirs is not None else usual)


def pretrained_values(name: str) -> dict:
    """The flag values a pretrained pipeline's config files imply (its UNet's sample_size and
    channels, its scheduler's T, beta schedule and prediction type); read, not loaded."""
    folder = resolve_pipeline_folder(name)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        scheduler = json.loads((folder / "scheduler" / SCHEDULER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise OptionsError(f"--pretrained_model_name_or_path {name}: cannot read its unet/config.json and "
                           f"scheduler/{SCHEDULER_CONFIG} ({error})") from error
    size = unet.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise OptionsError(f"--pretrained_model_name_or_path {name}: sample_size {size} is not square; "
                               "train.py trains square images")
        size = size[0]
    values = {"resolution": size, "num_channels": unet.get("in_channels", 3),
              "ddpm_num_steps": scheduler.get("num_train_timesteps", 1000),
              "ddpm_beta_schedule": scheduler.get("beta_schedule", "linear"),
              "prediction_type": scheduler.get("prediction_type", "epsilon")}
    return {k: v for k, v in values.items() if v is not None}


def validation_fraction(split: str) -> float | None:
    """--validation_split as a fraction of the training images (0 < f < 1), or None for a split name."""
    try:
        fraction = float(split)
    except ValueError:
        return None
    if not 0 < fraction < 1:
        raise OptionsError(f"--validation_split {split}: a fraction of the training images is between 0 and 1 "
                           "(e.g. 0.05), or give a split name (e.g. test)")
    return fraction


def _merge_aliases(opts: TrainOptions, names: tuple[str, ...], conflict: str):
    """The one value given under several names for the same option (diffusers' and ours)."""
    given = [name for name in names if getattr(opts, name) is not None]
    values = {getattr(opts, name) for name in given}
    if len(values) > 1:
        raise OptionsError(f"--{given[0]} and --{given[1]} {conflict}: give only one")
    return values.pop() if values else None


# --------------------------------------------------------------------------- the command line
GROUPS = {"data": "data", "model": "model and noise schedule", "optim": "optimisation",
          "output": "outputs, sampling and checkpoints", "scale": "scale (multi-device, multi-host)"}
_TYPES = {"str": str, "int": int, "float": float}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """argparse flags from the fields of TrainOptions: names, defaults, help and choices in one place."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for field in dataclasses.fields(TrainOptions):
        meta = field.metadata
        target = groups.get(meta.get("group"), parser)
        flag = f"--{field.name}"
        annotation = str(field.type).replace(" ", "").replace("|None", "")
        if annotation == "bool":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=meta["help"])
            continue
        kind = _TYPES[annotation.split("|")[0]]
        default = field.default
        shown = "" if default is None else f" (default: {default})"
        target.add_argument(flag, type=kind, default=default, choices=meta.get("choices"),
                            help=meta["help"] + shown, metavar=None if meta.get("choices") else kind.__name__.upper())
    return parser


def markdown_flag_table() -> str:
    """Every flag as the Markdown tables of docs/training.md (a test keeps the page equal to this).

    Print it with `python -c "from flaxdiff.training.options import markdown_flag_table as t; print(t())"`.
    """
    lines = []
    for group, title in GROUPS.items():
        lines += [f"**{title[0].upper()}{title[1:]}**", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for field in dataclasses.fields(TrainOptions):
            if field.metadata.get("group") != group:
                continue
            default = field.default
            shown = "—" if default is None else ("off" if default is False else "on" if default is True else default)
            meaning = field.metadata["help"]
            if field.metadata.get("choices"):
                meaning += " (" + " \\| ".join(map(str, field.metadata["choices"])) + ")"
            lines.append(f"| `--{field.name}` | {shown} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
