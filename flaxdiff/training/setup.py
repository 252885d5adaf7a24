"""Everything a run needs before its first step, checked in order of cost: flags and folders
first (no JAX work), then the data, the model, the state (restored when resuming) and the step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import jax
from jax.sharding import Mesh

from .. import doctor, host, parallel
from ..data import BUILTIN, DataSpec, class_names, load_image_data, resolve_dataset_name
from ..hub import check_hub_access
from ..image_cache import load_cached_image_data
from ..samplers import Plan, make_sampler
from ..schedule import NoiseSchedule
from .feed import BatchOrder, Feed, dataset_placement
from .loggers import Logger, check_logger, make_logger
from .metrics import MetricsLog
from .model import Model, build_model, null_label, scheduler_config_for, unet_config_for
from .options import PROFILE_DEFAULTS, TrainOptions
from .resume import check_resumable, find_checkpoint, read_meta, restore_state
from .stream import StreamFeed
from .run_folder import METRICS_FILE, SAMPLES, RunRecord, prepare_output_dir
from .step import TrainState, TrainStepConfig, create_train_state, make_train_step
from .validation import Validation, split_off_validation


@dataclasses.dataclass
class Run:
    """A prepared run: what the loop feeds, steps, and writes."""

    opts: TrainOptions
    record: RunRecord
    out: Path
    is_main: bool  # process 0 writes the folder's files
    say: Callable[[str], None]  # prints on process 0 only
    mesh: Mesh
    model: Model
    feed: Feed
    train_step: Callable  # step(state, batch, *feed.step_inputs) -> (state, metrics)
    state: TrainState
    start_step: int
    grid_plan: Plan  # the sampler plan of the grids saved while training
    metrics: MetricsLog
    logger: Logger  # --logger: TensorBoard, W&B or nothing
    validation: Validation | None  # --validation_split: the held-out images


def step_config_for(opts: TrainOptions, total_steps: int, null: int | None = None) -> TrainStepConfig:
    return TrainStepConfig(
        prediction_type=opts.prediction_type, learning_rate=opts.learning_rate, lr_scheduler=opts.lr_scheduler,
        lr_warmup_steps=opts.lr_warmup_steps, total_steps=total_steps, adam_beta1=opts.adam_beta1,
        adam_beta2=opts.adam_beta2, adam_weight_decay=opts.adam_weight_decay, adam_epsilon=opts.adam_epsilon,
        max_grad_norm=opts.max_grad_norm, use_ema=opts.use_ema, ema_inv_gamma=opts.ema_inv_gamma,
        ema_power=opts.ema_power, ema_max_decay=opts.ema_max_decay, random_flip=opts.random_flip,
        mixed_precision=opts.mixed_precision, class_conditional=opts.class_conditional,
        class_dropout_prob=opts.class_dropout_prob if opts.class_conditional else 0.0,
        null_class_label=null if null is not None else 0)


def data_spec(opts: TrainOptions, channels: int = 3) -> DataSpec:
    """What train.py loads: the training split, preprocessed as the flags say."""
    return DataSpec(dataset=opts.dataset, resolution=opts.resolution, channels=channels, center_crop=opts.center_crop,
                    dataset_config_name=opts.dataset_config_name, split=opts.split, image_column=opts.image_column,
                    cache_dir=opts.cache_dir, max_train_samples=opts.max_train_samples, num_shapes=opts.num_shapes,
                    seed=opts.seed, labels=opts.class_conditional, class_column=opts.class_column,
                    on_bad_image=opts.on_bad_image)


def workers(opts: TrainOptions) -> int:
    """--dataloader_num_workers, default one per core up to 8."""
    return min(8, host.cpu_cores()) if opts.dataloader_num_workers is None else opts.dataloader_num_workers


def load_training_images(spec: DataSpec, opts: TrainOptions, is_main: bool, say):
    """The decoded images: memory-mapped from the image cache (decoded into it the first time), or
    decoded into memory with --image_cache_dir none."""
    if opts.image_cache_dir == "none":
        return load_image_data(spec, progress=is_main)
    return load_cached_image_data(spec, opts.image_cache_dir, workers(opts), progress=is_main, log=say)


def prepare_run(opts: TrainOptions, log=print) -> Run:
    """`opts` resolved (options.resolve_options); bad input fails here before any expensive work."""
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *a, **k: None)
    say(doctor.summary())  # what this run runs on, for bug reports (python -m flaxdiff.doctor says more)

    # ---- everything that can be wrong, before any expensive work
    resolve_dataset_name(opts.dataset)  # a missing folder fails here
    spec = data_spec(opts)
    mesh = parallel.make_mesh()
    parallel.check_divisible(opts.train_batch_size, mesh)
    stream = StreamFeed(spec, opts, mesh, workers(opts)) if opts.streaming else None
    if opts.class_conditional:  # labels checked without decoding images
        names = stream.names if stream is not None else class_names(spec)
    else:
        names = None
    unet_config = unet_config_for(opts, len(names) if names else None)
    spec = dataclasses.replace(spec, channels=unet_config.in_channels)
    scheduler_config = scheduler_config_for(opts)
    grid_plan = make_sampler(opts.sampler, scheduler_config).plan(opts.num_inference_steps)
    check_logger(opts.logger)
    if opts.push_to_hub and is_main:
        if opts.hub_token:
            os.environ.setdefault("HF_TOKEN", opts.hub_token)
        check_hub_access(opts.hub_model_id)
    out = prepare_output_dir(opts, is_main)
    resume = find_checkpoint(opts.resume_from_checkpoint, out) if opts.resume_from_checkpoint else None
    if opts.resume_from_checkpoint and resume is None:
        say(f"no checkpoint in {out / 'checkpoints'} yet: starting a new run")
    if resume is not None:
        check_resumable(resume, opts, unet_config, say)
    parallel.connect_processes(mesh)  # before any other device work (multi-process runs)

    # ---- data
    say(f"loading {opts.dataset} ...")
    if stream is not None:
        stream.spec = spec
        feed, placement = stream, f"streamed (a shuffle buffer of {opts.shuffle_buffer_size} images)"
        validation = split_off_validation(opts, spec, None, is_main)[1]
    else:
        data = load_training_images(spec, opts, is_main, say)
        data, validation = split_off_validation(opts, spec, data, is_main)
        images, labels = (data.images, data.labels) if names else (data, None)
        order = BatchOrder(len(images), opts.train_batch_size, opts.gradient_accumulation_steps, opts.seed)
        on_device, placement = dataset_placement(opts.dataset_on_device, images.nbytes)
        feed = Feed(images, order, mesh, on_device, labels)
        del images, labels, data  # the feed holds what it needs (nothing, with the dataset on the devices)
    order = feed.order
    total_steps = opts.max_train_steps or opts.num_epochs * order.steps_per_epoch
    null = null_label(opts, len(names)) if names else None

    # ---- model, state, step
    model = build_model(unet_config, opts)
    step_config = step_config_for(opts, total_steps, null)
    state = parallel.replicate(create_train_state(model.params, step_config), mesh)
    start_step = 0
    if resume is not None:
        state = restore_state(resume, state)
        start_step = int(parallel.to_host(state.step))
        say(f"resumed from {resume[0] / str(resume[1])} at step {start_step}")
        if stream is not None:
            stream.load_state(read_meta(resume)["stream"])
    train_step = make_train_step(model.graphdef, NoiseSchedule.from_config(scheduler_config), step_config, mesh,
                                 opts.seed, gather=feed.gather)

    # ---- the run folder
    record = RunRecord(unet=unet_config.to_dict(), scheduler=scheduler_config, options=opts,
                       num_images=order.num_images, steps_per_epoch=order.steps_per_epoch, total_steps=total_steps,
                       class_names=names, null_label=null)
    metrics = MetricsLog(out / METRICS_FILE, write=is_main)
    if is_main:
        record.write(out)
        (out / SAMPLES).mkdir(exist_ok=True)
        metrics.trim(start_step)
    if opts.dataset == BUILTIN:
        say("built-in dataset: CPU demo defaults unless given (" + ", ".join(
            f"--{name} {getattr(opts, name)}" for name in PROFILE_DEFAULTS) + ")")
    if names:
        say(f"class-conditional: {len(names)} classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
            + (f", label {null} the null class for {opts.class_dropout_prob:.0%} of the training labels" if null
               is not None else ", no null class (--class_dropout_prob 0): no classifier-free guidance"))
    count = f"{order.num_images}" if order.num_images else "a stream of"
    say(f"{count} images of {opts.resolution}x{opts.resolution}x{unet_config.in_channels}, {placement}; "
        f"UNet {opts.model_preset or opts.model_config_name_or_path} with {model.num_params / 1e6:.2f}M parameters; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)")
    say(f"{total_steps} optimizer steps ({math.ceil(total_steps / order.steps_per_epoch)} epochs of "
        f"{order.steps_per_epoch}), global batch {opts.train_batch_size} x {opts.gradient_accumulation_steps} "
        f"accumulation -> {out}")
    warning = warmup_warning(opts, total_steps)
    if warning:
        say(warning)
    if validation is not None:
        say(f"validation: {len(validation.images)} images ({validation.source}), {opts.validation_num_timesteps} "
            "timesteps each, " + (f"every {opts.validation_steps} steps" if opts.validation_steps else
                                  "at every epoch's end"))
    logger = make_logger(opts, out, is_main)
    return Run(opts, record, out, is_main, say, mesh, model, feed, train_step, state, start_step, grid_plan, metrics,
               logger, validation)


def warmup_warning(opts: TrainOptions, total_steps: int) -> str | None:
    """A warning when the warmup is not shorter than the run: the learning rate would still be rising
    at the last step (diffusers' default 500 warmup steps against a short run)."""
    if opts.lr_scheduler == "constant" or opts.lr_warmup_steps < total_steps:
        return None
    return (f"warning: --lr_warmup_steps {opts.lr_warmup_steps} is not shorter than the run's {total_steps} steps: "
            f"the learning rate never reaches --learning_rate {opts.learning_rate:g} and never decays; a warmup of "
            f"about a tenth of the run is usual (--lr_warmup_steps {max(1, total_steps // 10)})")
