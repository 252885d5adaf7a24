"""`train()`: the training job. The loop feeds the step and calls the hooks; `setup` prepares the
run, `feed` brings the batches, `step` is the compiled train step, `run_folder` / `metrics` /
`model_card` are what it writes, `resume` restores a run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from .. import parallel, runtime
from ..checkpoint import Checkpoints
from .. import host
from ..host import release_free_memory
from ..hub import push_to_hub
from ..images import image_grid, to_unit_range
from ..pipeline import ClassCondition, ClassLabels, DiffusionPipeline, sample_program
from .memory import preflight
from .metrics import Progress, plot_loss_curve
from .model_card import model_card
from .options import TrainOptions, resolve_options
from .run_folder import CHECKPOINTS, MODEL_CARD, SAMPLES, copy_last_grid
from .setup import Run, prepare_run
from .step import sampling_params


def train(opts: TrainOptions, log=print) -> Path:
    """Run the training job; returns the output directory (a diffusers DDPMPipeline folder)."""
    opts = resolve_options(opts)
    runtime.enable_compilation_cache()
    runtime.initialize_distributed(opts.coordinator_address, opts.num_processes, opts.process_id)
    return run_loop(prepare_run(opts, log))


def run_loop(run: Run) -> Path:
    opts, order, total = run.opts, run.feed.order, run.record.total_steps
    every = (opts.logging_steps, opts.checkpointing_steps, order.steps_per_epoch)
    dispatches = dispatch_schedule(run.start_step, total, opts.steps_per_dispatch,
                                   every + ((opts.validation_steps,) if opts.validation_steps else ()))
    batches = run.feed.prefetch(dispatches, depth=opts.prefetch_batches)
    progress = Progress(run.start_step, total, opts.logging_steps, order.steps_per_epoch, order.step_size,
                        run.metrics, run.is_main, run.logger)
    grids = SampleGrids(run)
    checkpoints = Checkpoints(run.out / CHECKPOINTS, max_to_keep=opts.checkpoints_total_limit)
    state, start_time, compile_seconds = run.state, time.perf_counter(), None
    try:
        for first, count in dispatches:
            batch, compiling = batches.get(), compile_seconds is None
            if compiling:
                compile_ahead(run, progress, state, batch, count)
            state, metrics = run.train_step(state, batch, *run.feed.step_inputs)
            step = first + count
            if compiling:  # the first dispatch includes compilation: time it apart
                jax.block_until_ready(state.step)
                compile_seconds = time.perf_counter() - start_time
                progress.write(f"compiled and ran the first step in {compile_seconds:.1f}s")
            progress.dispatched(step, count, metrics, first=compiling)
            epoch_end = step % order.steps_per_epoch == 0 or step == total
            checkpoint_due = step % opts.checkpointing_steps == 0 or step == total
            validation_due = run.validation is not None and (
                step == total or (step % opts.validation_steps == 0 if opts.validation_steps else epoch_end))
            if not (epoch_end or checkpoint_due or validation_due):
                continue
            jax.block_until_ready(state.step)
            progress.meter.pause()  # images/s counts training only
            if validation_due:
                validate(run, state, step, progress)
            if checkpoint_due:
                position = run.feed.state_at(step)  # a stream's position; None for the in-memory feed
                meta = run.record.to_json() if position is None else {**run.record.to_json(), "stream": position}
                checkpoints.save(step, state, meta)
            if epoch_end:
                epoch_ended(run, state, step, grids, progress)
            progress.meter.start()
    finally:
        progress.close()
        checkpoints.wait()
        run.logger.close()
    checkpoints.close()
    finish(run)
    run.say(f"done: {total - run.start_step} steps in {time.perf_counter() - start_time:.0f}s (first step with "
            f"compile {compile_seconds or 0:.1f}s); final loss {progress.last_loss:.4f}; peak memory "
            f"{host.peak_rss_bytes() / 1e6:.0f} MB; pipeline, samples and loss curve in {run.out}")
    return run.out


def dispatch_schedule(start: int, total: int, steps_per_dispatch: int, every: tuple[int, ...]) -> list:
    """(first step, step count) of each dispatch: up to K steps each, never across a step where the
    loop must act (a multiple of one of `every`: logging, checkpointing, epoch end; the last)."""
    events = sorted({s for s in range(start + 1, total + 1) if s == total or any(s % n == 0 for n in every)})
    dispatches, step = [], start
    for event in events:
        while step < event:
            count = min(steps_per_dispatch, event - step)
            dispatches.append((step, count))
            step += count
    return dispatches


def compile_ahead(run: Run, progress: Progress, state, batch, count: int) -> None:
    """Compile the step before its first call: check that it fits a device (memory.preflight),
    read the model's FLOPs from XLA's cost analysis (for the logged FLOP/s and MFU), and return the
    compiler's freed memory to the OS before the step allocates its buffers. The jitted call
    reuses this executable."""
    lowered = run.train_step.lower(state, batch, *run.feed.step_inputs)
    progress.flops_per_step = float((lowered.cost_analysis() or {}).get("flops", 0.0)) / count
    peak = parallel.peak_flops_per_device()
    progress.peak_flops = peak * jax.device_count() if peak else None
    progress.write(preflight(lowered.compile(), run.opts))
    release_free_memory()


def validate(run: Run, state, step: int, progress: Progress) -> None:
    """The held-out bits/dim of the training weights and the EMA: a metrics.jsonl row, the logger,
    the progress bar."""
    row = {"step": step, **run.validation.run(run.model.sample_graphdef, state, run.record.scheduler,
                                              run.opts.validation_num_timesteps)}
    run.metrics.append(row)
    run.logger.log(step, row)
    progress.validated(row)
    progress.write(f"step {step}: validation {row['val_bpd']:.4f} bits/dim"
                   + (f", EMA {row['val_bpd_ema']:.4f}" if "val_bpd_ema" in row else "")
                   + f" ({row['val_seconds']:.1f}s)")


def epoch_ended(run: Run, state, step: int, grids: "SampleGrids", progress: Progress) -> None:
    """Every --save_images_epochs a sample grid, every --save_model_epochs the pipeline (and at the end)."""
    opts = run.opts
    epoch = math.ceil(step / run.feed.order.steps_per_epoch) - 1
    last = step == run.record.total_steps
    if epoch % opts.save_images_epochs == 0 or last:
        path = grids.save(state, f"epoch_{epoch:04d}_step_{step:06d}")
        progress.write(f"epoch {epoch}: samples -> {path}")
        if run.is_main:
            run.logger.image(step, "samples", path)
    if epoch % opts.save_model_epochs == 0 or last:
        save_pipeline(run, state, progress.last_loss, progress.last_validation)


MAX_GRID_ROWS = 16  # classes shown in a class-conditional grid


class SampleGrids:
    """Sample grids from the sampling weights (EMA when kept), always from the same latents and
    noise, so successive grids show the model changing, not the noise. A class-conditional run's
    grid has one row per class (the first MAX_GRID_ROWS), with --guidance_scale where it can."""

    def __init__(self, run: Run):
        self.run = run
        key = jax.random.key(0)
        opts, channels, names = run.opts, run.model.config.in_channels, run.record.class_names
        count, self.columns, self.condition = opts.eval_batch_size, None, None
        if names:
            rows = min(len(names), MAX_GRID_ROWS)
            self.columns = max(4, -(-count // rows))
            count = rows * self.columns
            labels = jnp.repeat(jnp.arange(rows, dtype=jnp.int32), self.columns)
            guided = run.record.null_label is not None and opts.guidance_scale != 1
            self.condition = parallel.replicate(ClassCondition(
                labels, jnp.full_like(labels, run.record.null_label) if guided else None,
                jnp.float32(opts.guidance_scale) if guided else None), run.mesh)
        shape = (count, opts.resolution, opts.resolution, channels)
        self.latents = parallel.replicate(jax.random.normal(jax.random.fold_in(key, 0), shape), run.mesh)
        self.plan = parallel.replicate(run.grid_plan, run.mesh)
        self.noise_key = parallel.replicate(jax.random.fold_in(key, 1), run.mesh)

    def save(self, state, tag: str) -> Path:
        final = sample_program(self.run.model.sample_graphdef, sampling_params(state), self.plan, self.latents, None,
                               self.noise_key, self.condition)
        path = self.run.out / SAMPLES / f"{tag}.png"
        if self.run.is_main:
            image_grid(to_unit_range(parallel.to_host(final)), columns=self.columns).save(path)
        return path


def save_pipeline(run: Run, state, final_loss: float, validation: dict | None = None) -> None:
    """The diffusers pipeline folder and its model card (process 0 writes; every process fetches)."""
    host_params = jax.tree.map(parallel.to_host, sampling_params(state))
    if run.is_main:
        unet = nnx.merge(run.model.sample_graphdef, host_params)
        names = run.record.class_names
        labels = ClassLabels(tuple(names), run.record.null_label) if names else None
        DiffusionPipeline(unet, run.record.scheduler, labels).save_pretrained(run.out)
        loss = None if math.isnan(final_loss) else final_loss
        (run.out / MODEL_CARD).write_text(model_card(run.record, run.opts.hub_model_id, loss, validation))


def finish(run: Run) -> None:
    """samples.png, the loss curve and the upload, once training is done."""
    if not run.is_main:
        return
    copy_last_grid(run.out)
    plot_loss_curve(run.metrics.rows(), run.out / "loss_curve.png")
    if run.opts.push_to_hub:
        run.say(f"uploading the pipeline to the Hub as {run.opts.hub_model_id} ...")
        run.say(f"pushed: {push_to_hub(run.out, run.opts.hub_model_id, run.opts.hub_private_repo, run.opts.hub_token)}")
