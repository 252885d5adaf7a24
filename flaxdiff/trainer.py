"""The training job behind train.py: options, checks, the loop, and what it writes.

Everything that touches files, clocks and progress bars is here; the math is in `training`.
Options use diffusers' `train_unconditional.py` flag names; every one is a field of `TrainOptions`
with its help text, which train.py turns into argparse flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from .host import release_free_memory
from .hub import check_hub_access, model_card, push_to_hub
from .data import BUILTIN, BatchPlan, DataSpec, image_grid, load_images, process_slice, \
    resolve_dataset_name

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
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
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
    "ddpm_num_inference_steps": (50, 100),
}
RUN_FILE = "train_config.json"


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
    max_train_samples: int | None = _opt(None, "use only the first N images", group="data")
    num_shapes: int = _opt(2048, f"how many images the built-in '{BUILTIN}' dataset has", group="data")
    resolution: int = _opt(32, "image size: shorter side resized to this (bilinear), then cropped square",
                           group="data")
    center_crop: bool = _opt(False, "crop the centre (default: a random crop, fixed per image by --seed)",
                             group="data")
    random_flip: bool = _opt(False, "flip images horizontally at random (on the device, every step)", group="data")
    # ------------------------------------------------------------------ model and noise
    model_preset: str | None = _opt(None, "UNet preset: tiny (CPU demos), course (Unit 1's), ddpm "
                                    "(train_unconditional's); default tiny for the built-in dataset, course otherwise",
                                    group="model", choices=tuple(PRESETS))
    model_config_name_or_path: str | None = _opt(None, "a diffusers UNet2DModel config.json (or a folder with "
                                                 "one, or a pipeline folder with unet/) instead of a preset",
                                                 group="model")
    num_channels: int = _opt(3, "image channels for presets: 3 (RGB) or 1 (grayscale)", group="model",
                             choices=(1, 3))
    prediction_type: str = _opt("epsilon", "what the model predicts", group="model",
                                choices=("epsilon", "sample", "v_prediction"))
    ddpm_num_steps: int = _opt(1000, "number of diffusion timesteps T", group="model")
    ddpm_beta_schedule: str = _opt("linear", "noise schedule", group="model",
                                   choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"))
    # ------------------------------------------------------------------ optimisation
    train_batch_size: int | None = _opt(None, "global batch size per optimizer step, split over all devices "
                                        "(default 16; 8 for the built-in dataset)", group="optim")
    gradient_accumulation_steps: int = _opt(1, "micro-batches of --train_batch_size per optimizer step",
                                            group="optim")
    num_epochs: int | None = _opt(None, "epochs to train (default 100; 10 for the built-in dataset)",
                                  group="optim")
    max_train_steps: int | None = _opt(None, "optimizer steps to train; overrides --num_epochs", group="optim")
    learning_rate: float | None = _opt(None, "peak learning rate (default 1e-4; 1e-3 for the built-in dataset)",
                                       group="optim")
    lr_scheduler: str = _opt("cosine", "learning-rate schedule, counted in optimizer steps", group="optim",
                             choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                      "polynomial"))
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
                                group="optim", choices=("no", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute UNet blocks in the backward pass to save memory "
                                        "(TPUs/GPUs; XLA:CPU schedules the recomputation early, so it saves "
                                        "nothing on CPUs)", group="optim")
    seed: int = _opt(0, "the run's seed: weights, data order, noise and crops all derive from it", group="optim")
    # ------------------------------------------------------------------ outputs
    output_dir: str | None = _opt(None, "where the pipeline, checkpoints, samples and metrics go "
                                  "(default: flaxdiff-<dataset>-<resolution>)", group="output")
    overwrite_output_dir: bool = _opt(False, "start over in an output_dir that holds another run (its checkpoints "
                                      "are deleted)", group="output")
    eval_batch_size: int = _opt(16, "images in each sample grid", group="output")
    save_images_epochs: int = _opt(10, "save a sample grid every N epochs (and at the end)", group="output")
    save_model_epochs: int = _opt(10, "save the diffusers pipeline every N epochs (and at the end)", group="output")
    sampler: str | None = _opt(None, "sampler for the grids saved while training (default ddim; ddpm for the "
                               "built-in dataset)", group="output", choices=SAMPLERS)
    ddpm_num_inference_steps: int | None = _opt(None, "sampling steps for those grids (default 50; 100 for the "
                                                "built-in dataset)", group="output")
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N optimizer steps (and at the end)",
                                    group="output")
    checkpoints_total_limit: int | None = _opt(None, "keep only the newest N checkpoints", group="output")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint path: continue that run exactly",
                                              group="output")
    logging_steps: int = _opt(10, "log loss, lr and images/s every N steps (the only host syncs)", group="output")
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
                                  group="scale", choices=("auto", "yes", "no"))
    coordinator_address: str | None = _opt(None, "multi-host: HOST:PORT of process 0 (not needed on TPU pods "
                                           "or SLURM, which JAX detects)", group="scale")
    num_processes: int | None = _opt(None, "multi-host: the number of processes", group="scale")
    process_id: int | None = _opt(None, "multi-host: this process's index", group="scale")


class OptionsError(ValueError):
    """Flags that are wrong or contradict each other; the message names them and the fix."""


def resolve_options(opts: TrainOptions) -> TrainOptions:
    """Aliases and data-dependent defaults filled in; contradictions are an OptionsError."""
    opts = dataclasses.replace(opts)
    given = [name for name in ("dataset", "dataset_name", "train_data_dir") if getattr(opts, name) is not None]
    values = {getattr(opts, name) for name in given}
    if len(values) > 1:
        raise OptionsError(f"--{given[0]} and --{given[1]} name different datasets: give only one")
    opts.dataset = values.pop() if values else BUILTIN
    builtin = opts.dataset == BUILTIN
    if opts.model_preset and opts.model_config_name_or_path:
        raise OptionsError("give --model_preset or --model_config_name_or_path, not both")
    if opts.model_config_name_or_path:
        opts.model_preset = None
    for name, (usual, demo) in PROFILE_DEFAULTS.items():
        if getattr(opts, name) is None and not (name == "model_preset" and opts.model_config_name_or_path):
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
    positive += [name for name in ("max_train_steps", "checkpoints_total_limit", "ddpm_num_inference_steps",
                                   "max_train_samples") if getattr(opts, name) is not None]
    for name in positive:
        if getattr(opts, name) < 1:
            raise OptionsError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.learning_rate <= 0:
        raise OptionsError(f"--learning_rate must be positive, got {opts.learning_rate}")
    if opts.lr_warmup_steps < 0:
        raise OptionsError(f"--lr_warmup_steps must be >= 0, got {opts.lr_warmup_steps}")
    if not 0 <= opts.ema_max_decay <= 1:
        raise OptionsError(f"--ema_max_decay must be in [0, 1], got {opts.ema_max_decay}")
    if (opts.hub_model_id or opts.hub_private_repo) and not opts.push_to_hub:
        raise OptionsError("--hub_model_id / --hub_private_repo only apply with --push_to_hub: add it")
    if opts.push_to_hub and opts.hub_model_id is None:
        from .hub import default_repo_name

        opts.hub_model_id = default_repo_name(opts.output_dir)
    steps = opts.ddpm_num_inference_steps
    if steps is not None and steps > opts.ddpm_num_steps:
        raise OptionsError(f"--ddpm_num_inference_steps {steps} exceeds --ddpm_num_steps {opts.ddpm_num_steps}")
    return opts


# --------------------------------------------------------------------------- model config
def unet_config_for(opts: TrainOptions):
    """The UNet2DConfig to train: a preset at --resolution, or a diffusers config file."""
    from .unet import UNet2DConfig

    if opts.model_config_name_or_path:
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
    return config


def scheduler_config_for(opts: TrainOptions) -> dict:
    """The DDPMScheduler config train_unconditional builds, as it is saved in scheduler/."""
    from .samplers import DDPMSampler

    config = DDPMSampler(num_train_timesteps=opts.ddpm_num_steps, beta_schedule=opts.ddpm_beta_schedule,
                         prediction_type=opts.prediction_type).to_config()
    return config


# --------------------------------------------------------------------------- output directory
def prepare_output_dir(opts: TrainOptions, is_main: bool) -> Path:
    """Check (and create) output_dir before any expensive work; never remove a user's files."""
    out = Path(opts.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OptionsError(f"--output_dir {out} is a file: choose a folder")
    holds_run = (out / RUN_FILE).exists() or (out / "checkpoints").exists()
    if out.is_dir() and any(out.iterdir()) and not opts.resume_from_checkpoint:
        if not holds_run:
            raise OptionsError(f"--output_dir {out} already holds files that are not a flaxdiff run; choose an "
                               "empty or new folder")
        if not opts.overwrite_output_dir:
            raise OptionsError(f"--output_dir {out} holds a previous run: pass --resume_from_checkpoint latest to "
                               "continue it, --overwrite_output_dir to start over (deletes its checkpoints), or "
                               "another --output_dir")
    from .parallel import barrier

    barrier("output_dir checked")  # every process has looked before any process writes
    try:  # every process: multi-host checkpoints are written by all of them
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OptionsError(f"--output_dir {out} is not writable ({error.strerror}): choose another folder") \
            from error
    if is_main and opts.overwrite_output_dir and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    return out


# --------------------------------------------------------------------------- where the dataset lives
AUTO_SHARE = 0.25  # --dataset_on_device auto: at most this share of a device's memory


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def dataset_placement(mode: str, nbytes: int) -> tuple[bool, str]:
    """Whether the uint8 dataset of `nbytes` stays in device memory (--dataset_on_device), and why.

    Every device holds a full copy. On TPUs/GPUs it sits in the device's own memory and saves the
    per-step host-to-device copy of the batch; `auto` takes that when the dataset needs at most
    AUTO_SHARE of the device's memory. CPU devices live in host memory, where a copy per device
    gains nothing (measured: benchmarks/bench_data_path.py), so `auto` keeps the host path there;
    `yes` still works, counted against the host's RAM.
    """
    import jax

    from . import parallel

    if mode == "no":
        return False, "on the host (--dataset_on_device no)"
    per_device = parallel.device_memory_bytes()
    if per_device is not None:
        need, room = nbytes, per_device
        where = f"a {jax.local_devices()[0].device_kind} device's {_size(room)}"
    else:
        if mode == "auto":
            return False, "on the host (CPU devices share host memory; --dataset_on_device yes to copy it to each)"
        need, room = nbytes * jax.local_device_count(), parallel.host_memory_bytes()
        where = f"host memory ({_size(room or 0)}) for {jax.local_device_count()} CPU device copies"
    if mode == "auto":
        if need <= AUTO_SHARE * room:
            return True, f"in device memory ({_size(nbytes)} per device)"
        return False, (f"on the host: {_size(need)} is more than {AUTO_SHARE:.0%} of {where} "
                       "(--dataset_on_device yes to override)")
    if room is not None and need > 0.9 * room:
        raise OptionsError(f"--dataset_on_device yes: the dataset needs {_size(need)} as uint8 but {where} "
                           "cannot hold it next to the model; use --dataset_on_device no (batches gathered on "
                           "the host and prefetched) or fewer images (--max_train_samples)")
    return True, f"in device memory ({_size(nbytes)} per device, --dataset_on_device yes)"


# --------------------------------------------------------------------------- small helpers
def to_host(x) -> np.ndarray:
    """A replicated (or local) jax.Array as numpy, on any process."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


class Prefetcher:
    """Prepares the next batches on a background thread, ahead of the device."""

    def __init__(self, make_batch, steps: list[tuple[int, int]], depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(make_batch, steps), daemon=True)
        self.thread.start()

    def _run(self, make_batch, steps):
        try:
            for start, count in steps:
                self.queue.put(make_batch(start, count))
        except BaseException as error:  # re-raised in the consumer, never lost
            self.queue.put(error)

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Throughput:
    """Images per second of training time only (pauses for sampling and saving excluded)."""

    def __init__(self):
        self.images, self.seconds, self.since = 0, 0.0, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def pause(self) -> None:
        if self.since is not None:
            self.seconds += time.perf_counter() - self.since
            self.since = None

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float | None:
        """The rate since the last call (call it after a device sync), then start a new window."""
        running = self.since is not None
        self.pause()
        rate = self.images / self.seconds if self.images and self.seconds > 0 else None
        self.images, self.seconds = 0, 0.0
        if running:
            self.start()
        return rate


def plot_loss_curve(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _trim_metrics(metrics_file: Path, last_step: int) -> None:
    """On resume, drop log lines past the checkpoint: the resumed run writes them again."""
    if metrics_file.exists():
        lines = [line for line in metrics_file.read_text().splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= last_step]
        metrics_file.write_text("".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- the job
def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default: a second run starts without compiling.

    Uses $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/flaxdiff/jax.
    """
    import jax

    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/flaxdiff/jax")
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def train(opts: TrainOptions, log=print) -> Path:
    """Run the training job; returns the output directory (a diffusers DDPMPipeline folder)."""
    opts = resolve_options(opts)
    from .parallel import initialize_distributed

    enable_compilation_cache()
    initialize_distributed(opts.coordinator_address, opts.num_processes, opts.process_id)
    return _train(opts, log)


def _train(opts: TrainOptions, log) -> Path:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from . import parallel
    from .checkpoint import Checkpoints, abstract_like, find_checkpoint
    from .pipeline import DiffusionPipeline, _sample_program
    from .samplers import make_sampler
    from .schedule import NoiseSchedule
    from .training import StepConfig, create_train_state, make_train_step, sampling_params
    from .unet import UNet2D

    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *a, **k: None)

    # ---- everything that can be wrong, before any expensive work
    resolve_dataset_name(opts.dataset)  # a missing folder fails here
    unet_config = unet_config_for(opts)
    scheduler_config = scheduler_config_for(opts)
    sampler = make_sampler(opts.sampler, scheduler_config)
    sample_plan = sampler.plan(min(opts.ddpm_num_inference_steps, opts.ddpm_num_steps))
    mesh = parallel.make_mesh()
    parallel.check_divisible(opts.train_batch_size, mesh)
    if opts.push_to_hub and is_main:
        if opts.hub_token:
            os.environ.setdefault("HF_TOKEN", opts.hub_token)
        check_hub_access(opts.hub_model_id)
    out = prepare_output_dir(opts, is_main)
    resume = None
    if opts.resume_from_checkpoint:
        resume = find_checkpoint(opts.resume_from_checkpoint, out)
        if resume is None:
            say(f"no checkpoint in {out / 'checkpoints'} yet: starting a new run")
        else:
            meta = Checkpoints(resume[0], read_only=True).read_meta(resume[1])
            theirs, ours = meta.get("unet", {}), unet_config.to_dict()
            diff = sorted(k for k in set(theirs) | set(ours) if not k.startswith("_") and theirs.get(k) != ours.get(k))
            if diff:
                raise OptionsError(f"the checkpoint {resume[0] / str(resume[1])} is of another model config "
                                   f"(differs in {', '.join(diff)}); resume with the flags it was trained with, "
                                   "or use another --output_dir")
            for key in ("train_batch_size", "gradient_accumulation_steps", "seed", "prediction_type",
                        "ddpm_num_steps", "ddpm_beta_schedule"):
                if key in meta.get("options", {}) and meta["options"][key] != getattr(opts, key):
                    say(f"warning: --{key} was {meta['options'][key]} in the checkpoint and is "
                        f"{getattr(opts, key)} now: the resumed run will not follow the original trajectory")

    # ---- data
    spec = DataSpec(dataset=opts.dataset, resolution=opts.resolution, channels=unet_config.in_channels,
                    center_crop=opts.center_crop, dataset_config_name=opts.dataset_config_name, split=opts.split,
                    image_column=opts.image_column, cache_dir=opts.cache_dir,
                    max_train_samples=opts.max_train_samples, num_shapes=opts.num_shapes, seed=opts.seed)
    say(f"loading {opts.dataset} ...")
    images = load_images(spec, progress=is_main)
    plan = BatchPlan(len(images), opts.train_batch_size, opts.gradient_accumulation_steps, opts.seed)
    on_device, placement = dataset_placement(opts.dataset_on_device, images.nbytes)
    total_steps = opts.max_train_steps or opts.num_epochs * plan.steps_per_epoch
    num_epochs = math.ceil(total_steps / plan.steps_per_epoch)

    # ---- model and state
    dtype = jnp.bfloat16 if opts.mixed_precision == "bf16" else jnp.float32
    model = UNet2D(unet_config, rngs=nnx.Rngs(opts.seed), dtype=dtype,
                   gradient_checkpointing=opts.gradient_checkpointing)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    sample_graphdef = graphdef if (dtype == jnp.float32 and not opts.gradient_checkpointing) else \
        nnx.graphdef(UNet2D(unet_config, rngs=nnx.Rngs(0)))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    step_config = StepConfig(
        prediction_type=opts.prediction_type, learning_rate=opts.learning_rate, lr_scheduler=opts.lr_scheduler,
        lr_warmup_steps=opts.lr_warmup_steps, total_steps=total_steps, adam_beta1=opts.adam_beta1,
        adam_beta2=opts.adam_beta2, adam_weight_decay=opts.adam_weight_decay, adam_epsilon=opts.adam_epsilon,
        max_grad_norm=opts.max_grad_norm, use_ema=opts.use_ema, ema_inv_gamma=opts.ema_inv_gamma,
        ema_power=opts.ema_power, ema_max_decay=opts.ema_max_decay, random_flip=opts.random_flip,
        mixed_precision=opts.mixed_precision)
    state = parallel.replicate(create_train_state(params, step_config), mesh)
    checkpoints = Checkpoints(out / "checkpoints", max_to_keep=opts.checkpoints_total_limit)
    start_step = 0
    if resume is not None:
        restored_from = Checkpoints(resume[0], read_only=True)
        state = restored_from.restore(resume[1], abstract_like(state))
        start_step = int(to_host(state.step))
        say(f"resumed from {resume[0] / str(resume[1])} at step {start_step}")
    schedule = NoiseSchedule.from_config(scheduler_config)
    train_step = make_train_step(graphdef, schedule, step_config, mesh, opts.seed,
                                 gather=partial(parallel.gather_batch, mesh=mesh, batch_axis=2) if on_device else None)

    meta = {"unet": unet_config.to_dict(), "scheduler": scheduler_config, "options": dataclasses.asdict(opts),
            "num_images": plan.num_images, "steps_per_epoch": plan.steps_per_epoch, "total_steps": total_steps}
    metrics_file, samples_dir = out / "metrics.jsonl", out / "samples"
    if is_main:
        (out / RUN_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        samples_dir.mkdir(exist_ok=True)
        _trim_metrics(metrics_file, start_step)
    if opts.dataset == BUILTIN:
        say("built-in dataset: CPU demo defaults unless given (" + ", ".join(
            f"--{name} {getattr(opts, name)}" for name in PROFILE_DEFAULTS) + ")")
    say(f"{len(images)} images of {opts.resolution}x{opts.resolution}x{unet_config.in_channels}, {placement}; "
        f"UNet {opts.model_preset or opts.model_config_name_or_path} with {num_params / 1e6:.2f}M parameters; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)")
    say(f"{total_steps} optimizer steps ({num_epochs} epochs of {plan.steps_per_epoch}), global batch "
        f"{opts.train_batch_size} x {opts.gradient_accumulation_steps} accumulation -> {out}")

    # ---- batches, prepared ahead of the device
    K = opts.steps_per_dispatch
    dispatches, step = [], start_step
    events = sorted({s for s in range(start_step + 1, total_steps + 1)
                     if s % opts.logging_steps == 0 or s % opts.checkpointing_steps == 0
                     or s % plan.steps_per_epoch == 0 or s == total_steps})
    for event in events:
        while step < event:
            count = min(K, event - step)
            dispatches.append((step, count))
            step += count

    def local_indices(first: int, count: int) -> np.ndarray:  # (K, accumulation, micro_batch / processes)
        return np.stack([process_slice(plan.indices(s), jax.process_index(), jax.process_count())
                         for s in range(first, first + count)])

    if on_device:  # the host sends only indices; the step gathers each device's part from its own copy
        device_data = parallel.DeviceDataset(images, mesh, batch_axis=2)
        step_inputs = (device_data.data,)
        del images

        def make_batch(first: int, count: int):
            return device_data.indices(local_indices(first, count))
    else:
        step_inputs = ()

        def make_batch(first: int, count: int):
            return parallel.global_batch(images[local_indices(first, count)], mesh, batch_axis=2)

    prefetch = Prefetcher(make_batch, dispatches)

    # ---- sampling and saving with the EMA (or training) weights
    sample_key = jax.random.key(0)
    channels = unet_config.in_channels
    latents = parallel.replicate(jax.random.normal(jax.random.fold_in(sample_key, 0),
                                                   (opts.eval_batch_size, opts.resolution, opts.resolution,
                                                    channels)), mesh)
    sample_plan = parallel.replicate(sample_plan, mesh)

    noise_key = parallel.replicate(jax.random.fold_in(sample_key, 1), mesh)

    def save_samples(tag: str) -> Path:
        final = _sample_program(sample_graphdef, sampling_params(state), sample_plan, latents, None, noise_key)
        grid = image_grid((to_host(final) / 2 + 0.5).clip(0, 1))
        path = samples_dir / f"{tag}.png"
        if is_main:
            grid.save(path)
        return path

    def save_pipeline(final_loss: float | None = None) -> None:
        host_params = jax.tree.map(to_host, sampling_params(state))
        if is_main:
            DiffusionPipeline(nnx.merge(sample_graphdef, host_params), scheduler_config).save_pretrained(out)
            card = model_card(meta, opts.hub_model_id, None if final_loss is None or math.isnan(final_loss)
                              else final_loss)
            (out / "README.md").write_text(card)

    # ---- the loop
    bar = tqdm(total=total_steps, initial=start_step, disable=not is_main, desc="training", unit="step",
               dynamic_ncols=True)
    meter = Throughput()
    pending, compile_seconds, last_loss = [], None, float("nan")
    start_time = time.perf_counter()
    flops_per_step, peak = None, parallel.peak_flops_per_device()
    try:
        for first, count in dispatches:
            batch = prefetch.get()
            if flops_per_step is None:
                lowered = train_step.lower(state, batch, *step_inputs)
                flops_per_step = float((lowered.cost_analysis() or {}).get("flops", 0.0)) / count  # for mfu
                lowered.compile()  # the jitted step reuses this executable
                release_free_memory()  # the compiler's freed memory, back to the OS before the step's buffers
            state, metrics = train_step(state, batch, *step_inputs)
            step = first + count
            pending.append(metrics)
            if compile_seconds is None:  # the first dispatch includes compilation: time it apart
                jax.block_until_ready(state.step)
                compile_seconds = time.perf_counter() - start_time
                bar.write(f"compiled and ran the first step in {compile_seconds:.1f}s") if is_main else None
                meter.start()
            else:
                meter.add(count * plan.step_size)
            bar.update(count)
            if step % opts.logging_steps == 0 or step == total_steps:
                fetched = jax.tree.map(to_host, pending)  # the only host sync of the loop
                row = _log_row(step, fetched, meter.rate(), plan)
                if row["images_per_sec"] and flops_per_step:
                    flops_per_sec = flops_per_step * row["images_per_sec"] / plan.step_size
                    row["flops_per_sec"] = flops_per_sec
                    if peak:
                        row["mfu"] = flops_per_sec / (peak * jax.device_count())
                if is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                last_loss, pending = row["loss"], []
                rate = row["images_per_sec"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                img_s=f"{rate:.1f}" if rate else "-")
            epoch_end = step % plan.steps_per_epoch == 0 or step == total_steps
            checkpoint_due = step % opts.checkpointing_steps == 0 or step == total_steps
            if not (epoch_end or checkpoint_due):
                continue
            jax.block_until_ready(state.step)
            meter.pause()  # images/s counts training only
            if checkpoint_due:
                checkpoints.save(step, state, meta)
            if epoch_end:
                epoch = math.ceil(step / plan.steps_per_epoch) - 1
                last = step == total_steps
                if epoch % opts.save_images_epochs == 0 or last:
                    path = save_samples(f"epoch_{epoch:04d}_step_{step:06d}")
                    bar.write(f"epoch {epoch}: samples -> {path}") if is_main else None
                if epoch % opts.save_model_epochs == 0 or last:
                    save_pipeline(last_loss)
            meter.start()
    finally:
        bar.close()
        checkpoints.wait()
    checkpoints.close()
    if is_main:
        grids = sorted(samples_dir.glob("epoch_*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / "samples.png")
        plot_loss_curve(metrics_file, out / "loss_curve.png")
        if opts.push_to_hub:
            say(f"uploading the pipeline to the Hub as {opts.hub_model_id} ...")
            say(f"pushed: {push_to_hub(out, opts.hub_model_id, opts.hub_private_repo, opts.hub_token)}")
    total = time.perf_counter() - start_time
    say(f"done: {total_steps - start_step} steps in {total:.0f}s (first step with compile "
        f"{compile_seconds or 0:.1f}s); final loss {last_loss:.4f}; pipeline, samples and loss curve in {out}")
    return out


def _log_row(step: int, fetched: list, rate: float | None, plan: BatchPlan) -> dict:
    """One metrics.jsonl line: the window's mean loss, the last step's lr / grad norm / EMA decay."""
    losses = np.concatenate([np.asarray(m["loss"]) for m in fetched])
    last = fetched[-1]
    row = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, "loss": float(losses.mean()),
           "lr": float(last["lr"][-1]), "grad_norm": float(last["grad_norm"][-1]), "images_per_sec": rate}
    if "ema_decay" in last:
        row["ema_decay"] = float(last["ema_decay"][-1])
    return row
