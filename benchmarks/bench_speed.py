"""flaxdiff against PyTorch diffusers, in one run on this machine: training images/s, sampling
UNet evaluations/s, compile times, peak memory and FLOPs.

    python benchmarks/bench_speed.py                 # the course UNet, 32 px (about 17 minutes on 2 CPU cores)
    python benchmarks/bench_speed.py --quick         # fewer steps and rounds: a smoke run of the same table
    python benchmarks/bench_speed.py --train_batch 256 --mixed_precision bf16   # on a TPU or GPU

On a TPU or GPU it runs as it is: without torch installed it measures flaxdiff alone (images/s,
UNet evaluations/s, compile times and the model FLOPs utilisation against the device's peak,
flaxdiff/parallel.py's PEAK_FLOPS or $FLAXDIFF_PEAK_FLOPS); with a CUDA build of torch it runs
diffusers on the same GPU, side by side. `--frameworks flaxdiff` leaves diffusers out anywhere.

Every measurement runs in a fresh subprocess, so each peak resident memory is that job's own, and
the two frameworks take turns for --rounds rounds; the table gives the median of the rounds (this
machine's speed varies by several percent from one minute to the next). Both sides use the same
UNet config, batch and float32 weights; torch with its default threads, JAX on its default
backend. flaxdiff runs as train.py and sample.py run it: with glibc's huge-page malloc tunable,
which they set for themselves, and for sampling with the JAX CPU devices sample.py picks (one
per core for small and mid-sized UNets, flaxdiff/host.py); diffusers runs as `python train_unconditional.py` does,
without it, and once more with it, so its effect on torch is in the table too. Compile time is
reported apart from steady-state speed. Results go to stdout (a markdown table) and
benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COURSE = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
              down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unet_config(config: dict | None) -> dict:
    """The worker's UNet config (JSON turns tuples into lists; both libraries take tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (config or COURSE).items()}


def image_shape(config: dict) -> tuple[int, int, int]:
    return config["sample_size"], config["sample_size"], config.get("in_channels", 3)


def jax_top_ops(compiled, one_call, count: int = 3, calls: int = 2) -> list[dict]:
    """The `count` most expensive operations of a compiled XLA program, from a jax.profiler trace of
    `calls` calls of one_call() (which runs it and returns its outputs): each executed HLO instruction's time (XLA:CPU's thunk events), summed per opcode
    and the JAX primitive it came from (the instruction's op_name metadata), as shares of the total."""
    import glob
    import gzip
    import re
    import tempfile

    import jax

    kinds = {}
    for line in compiled.as_text().splitlines():
        match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(', line)
        if match:
            op_name = re.search(r'op_name="([^"]+)"', line)
            primitive = re.sub(r"\[.*", "", op_name.group(1).split("/")[-1]) if op_name else "?"
            # XLA names instructions by what they do (convolution.3, transpose_copy_fusion.2, ...)
            kinds[match.group(1)] = f"{re.sub(r'[.][0-9]+$', '', match.group(1))} ({primitive})"
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(one_call())
        trace = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = {}
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        # a loop's or call's own event spans its body's instructions, which have events of their own
        if event.get("ph") == "X" and op and not op.startswith(("while", "conditional", "call")):
            kind = kinds.get(op, op)
            totals[kind] = totals.get(kind, 0.0) + event.get("dur", 0.0)
    return top_shares(totals, count)


def top_shares(totals: dict, count: int) -> list[dict]:
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:count]
    return [{"op": name, "share": seconds / whole} for name, seconds in ranked]


def torch_top_ops(one_step, count: int = 3, calls: int = 2) -> list[dict]:
    """The `count` most expensive aten operations of `calls` calls of one_step (self CPU time)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(calls):
            one_step()
    return top_shares({e.key: e.self_cpu_time_total for e in profile.key_averages()}, count)


def textbook_upsample_conv(x, kernel, bias):
    """Upsample2D as diffusers computes it (upsample, then the 3x3 convolution): only for counting
    the textbook model's FLOPs, which flaxdiff's low-resolution form (flaxdiff/ops.py) lowers."""
    import jax
    import jax.numpy as jnp

    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, kernel.astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias.astype(x.dtype)


# --------------------------------------------------------------------------- workers (one per subprocess)
def flax_training(batch: int, mixed_precision: str = "no", config: dict | None = None,
                  gradient_checkpointing: bool = False):
    """flaxdiff's training as train.py sets it up, for a fixed batch of random images: the UNet's
    graphdef, the mesh over every device, the step's config, the replicated train state and the batch."""
    import numpy as np
    import jax.numpy as jnp
    from flax import nnx

    from flaxdiff import parallel
    from flaxdiff.training.step import TrainStepConfig, create_train_state
    from flaxdiff.unet import UNet2D

    dtype = jnp.bfloat16 if mixed_precision == "bf16" else jnp.float32
    config = unet_config(config)
    graphdef, params = nnx.split(UNet2D(config, rngs=nnx.Rngs(0), dtype=dtype,
                                        gradient_checkpointing=gradient_checkpointing))
    mesh = parallel.make_mesh()
    step_config = TrainStepConfig(total_steps=1000, lr_warmup_steps=0, mixed_precision=mixed_precision)
    state = parallel.replicate(create_train_state(nnx.to_pure_dict(params), step_config), mesh)
    images = np.random.default_rng(0).integers(0, 256, (1, 1, batch, *image_shape(config)), dtype=np.uint8)
    return graphdef, mesh, step_config, state, parallel.global_batch(images, mesh, batch_axis=2)


def flax_train(batch: int, steps: int, mixed_precision: str = "no", config: dict | None = None,
               profile: bool = False) -> dict:
    import jax

    from flaxdiff import ops, parallel
    from flaxdiff.host import release_free_memory
    from flaxdiff.schedule import NoiseSchedule
    from flaxdiff.training.step import make_train_step

    graphdef, mesh, config, state, batch_array = flax_training(batch, mixed_precision, config)
    fast_upsample, ops.upsample_conv = ops.upsample_conv, textbook_upsample_conv
    textbook = make_train_step(graphdef, NoiseSchedule.from_config(), config, mesh, seed=0)
    model_flops = textbook.lower(state, batch_array).cost_analysis()["flops"]
    ops.upsample_conv = fast_upsample
    step = make_train_step(graphdef, NoiseSchedule.from_config(), config, mesh, seed=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_array).compile()
    compile_seconds = time.perf_counter() - start
    release_free_memory()  # as train.py does after compiling
    flops = compiled.cost_analysis()["flops"]
    state, metrics = compiled(state, batch_array)  # warm-up
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch_array)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds)
    peak = parallel.peak_flops_per_device()
    result = {"images_per_sec": batch / per_step, "compile_seconds": compile_seconds,
              "flops_per_image": flops / batch, "model_flops_per_image": model_flops / batch,
              "mfu": model_flops / per_step / (peak * jax.device_count()) if peak else None,
              "peak_rss_mb": peak_rss_mb(), "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}
    if profile:  # after the timed steps, so tracing does not slow them
        def one_step():
            nonlocal state
            state, step_metrics = compiled(state, batch_array)  # the state is donated: thread it
            return step_metrics
        result["top_ops"] = jax_top_ops(compiled, one_step)
    return result


def torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_training(batch: int, mixed_precision: str = "no", config: dict | None = None):
    """A faithful transcription of train_unconditional.py's step (epsilon loss, clip 1.0, AdamW;
    bf16 autocast as accelerate's mixed_precision="bf16"): the model, its optimizer and one step
    (a closure over a fixed batch of clean images)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    device = torch_device()
    torch.manual_seed(0)
    config = unet_config(config)
    model = UNet2DModel(**config).train().to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    height, width, channels = image_shape(config)
    clean = torch.rand(batch, channels, height, width, device=device) * 2 - 1
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if mixed_precision == "bf16"
                else contextlib.nullcontext())

    def one_step():
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, 1000, (batch,), device=device).long()
        with autocast:
            output = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = F.mse_loss(output.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    return model, optimizer, one_step


def torch_train(batch: int, steps: int, mixed_precision: str = "no", config: dict | None = None,
                profile: bool = False) -> dict:
    import torch

    device = torch_device()
    _, _, one_step = torch_training(batch, mixed_precision, config)
    one_step()  # warm-up
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        seconds.append(time.perf_counter() - start)
    result = {"images_per_sec": batch / statistics.median(seconds), "peak_rss_mb": peak_rss_mb(),
              "threads": torch.get_num_threads(), "device": device}
    if profile:
        result["top_ops"] = torch_top_ops(one_step)
    return result


def flax_sample(sampler: str, steps: int, batch: int, compile_only: tuple = (), config: dict | None = None) -> dict:
    import jax
    from flax import nnx

    from flaxdiff.pipeline import DiffusionPipeline, sample_program, spread_over_devices
    from flaxdiff.unet import UNet2D

    config = unet_config(config)
    pipe = DiffusionPipeline(UNet2D(config, rngs=nnx.Rngs(0)), {"_class_name": "DDPMScheduler"})
    graphdef, state = nnx.split(pipe.unet)
    latents = jax.random.normal(jax.random.key(0), (batch, *image_shape(config)))
    key = jax.random.key(1)
    # the batch over every device, as DiffusionPipeline.__call__ (and sample.py) run it
    _, (state, plan, latents, _, _, _) = spread_over_devices(state, pipe.plan(sampler, steps), latents, None)
    result = {"devices": jax.device_count()}
    for count in compile_only:  # compile times of the same sampler at other step counts
        _, (_, other, *_) = spread_over_devices(state, pipe.plan(sampler, count), latents, None)
        start = time.perf_counter()
        sample_program.lower(graphdef, state, other, latents, None, key).compile()
        result[f"compile_seconds_{count}"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = sample_program.lower(graphdef, state, plan, latents, None, key).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, plan, latents, None, key))
    seconds = time.perf_counter() - start
    return {**result, "evals_per_sec": batch * steps / seconds, "compile_seconds": compile_seconds,
            "peak_rss_mb": peak_rss_mb()}


def torch_sample(sampler: str, steps: int, batch: int, config: dict | None = None) -> dict:
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config(config)).eval()
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe = pipe.to(torch_device())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(batch_size=batch, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
        start = time.perf_counter()
        pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
    return {"evals_per_sec": batch * steps / seconds, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"flax_train": flax_train, "torch_train": torch_train, "flax_sample": flax_sample,
           "torch_sample": torch_sample}


# --------------------------------------------------------------------------- the driver
def run_worker(name: str, tuned: bool, per_core: bool = False, extra_env: dict | None = None, **kwargs) -> dict:
    """One measurement in a fresh process. `tuned`: with glibc's huge-page malloc tunable, as
    flaxdiff's CLIs run; `per_core`: one CPU device per core where sample.py's rule gives it (flaxdiff/host.py)."""
    from flaxdiff.host import TUNABLE, one_cpu_device_per_core

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_NUM_CPU_DEVICES")}
    env.update(extra_env or {})
    if tuned:
        env["GLIBC_TUNABLES"] = TUNABLE
    if per_core:
        one_cpu_device_per_core(kwargs["batch"], env, unet_config=kwargs.get("config"))
    command = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    print(f"  running {name}{' (malloc tunable)' if tuned else ''} {kwargs} ...", file=sys.stderr, flush=True)
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode:
        sys.exit(f"{name} {kwargs} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    if "avx512_bf16" in flags:
        isa += " with BF16"
    import jax

    line = (f"{cpu} ({isa}), {os.cpu_count()} cores, {platform.system()}; jax {jax.__version__} "
            f"({jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind})")
    if importlib.util.find_spec("torch"):
        import torch

        line += f", torch {torch.__version__} ({torch_device()}, {torch.get_num_threads()} threads)"
    return line


def median_of(rounds: list[dict]) -> dict:
    """Per key, the median over rounds (the rounds themselves kept for the JSON)."""
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], (int, float))]
    return {**{k: statistics.median(r[k] for r in rounds) for k in keys}, "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer steps and one round: a smoke run of the table")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per framework, taking turns; the "
                        "table reports the medians (default: 3)")
    parser.add_argument("--train_steps", type=int, default=6, help="timed training steps per round (default: 6)")
    parser.add_argument("--ddpm_steps", type=int, default=1000, help="DDPM sampling steps, timed once per "
                        "framework (default: 1000; the 50- and 1000-step compile times are measured either way)")
    parser.add_argument("--train_batch", type=int, default=64)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no", help="training compute dtype "
                        "on both sides (bf16: flaxdiff's --mixed_precision bf16, torch's bf16 autocast)")
    parser.add_argument("--frameworks", default=None, help="flaxdiff,diffusers (default: both where torch and "
                        "diffusers are installed, else flaxdiff alone)")
    parser.add_argument("--output", default=str(HERE / "results" / "speed.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return 0

    rounds = 1 if args.quick else args.rounds
    train_steps = 2 if args.quick else args.train_steps
    ddpm_steps = 20 if args.quick else args.ddpm_steps
    with_torch = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers"))
    frameworks = set((args.frameworks or ("flaxdiff,diffusers" if with_torch else "flaxdiff")).split(","))
    train = dict(batch=args.train_batch, steps=train_steps, mixed_precision=args.mixed_precision)
    jobs = {"flax_train": ("flax_train", True, False, train),
            "flax_ddim": ("flax_sample", True, True, dict(sampler="ddim", steps=50, batch=args.sample_batch)),
            "flax_ddim_one_device": ("flax_sample", True, False, dict(sampler="ddim", steps=50, batch=args.sample_batch))}
    if "diffusers" in frameworks:
        jobs.update({"torch_train": ("torch_train", False, False, train),
                     "torch_train_tuned": ("torch_train", True, False, train),
                     "torch_ddim": ("torch_sample", False, False, dict(sampler="ddim", steps=50, batch=args.sample_batch))})
    runs = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (worker, tuned, per_core, kwargs) in jobs.items():
            runs[name].append(run_worker(worker, tuned, per_core=per_core, **kwargs))
    r = {"machine": machine(), "config": f"course UNet (64, 128, 128, 256), 32x32, training in "
                                         f"{'bf16' if args.mixed_precision == 'bf16' else 'float32'}",
         "ddpm_steps": ddpm_steps, "train_batch": args.train_batch,
         **{name: median_of(values) for name, values in runs.items()}}
    r["flax_ddpm"] = run_worker("flax_sample", True, per_core=True, sampler="ddpm", steps=ddpm_steps,
                                batch=args.sample_batch, compile_only=(50, 1000))
    if "diffusers" in frameworks:
        r["torch_ddpm"] = run_worker("torch_sample", False, sampler="ddpm", steps=ddpm_steps, batch=args.sample_batch)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


def table(r: dict) -> str:
    """The markdown table; diffusers' column is '-' where it did not run (no torch)."""
    missing = {"rounds": [], "images_per_sec": None, "evals_per_sec": None, "peak_rss_mb": None}
    ft, fd = r["flax_train"], r["flax_ddpm"]
    tt, tu = r.get("torch_train", missing), r.get("torch_train_tuned", missing)
    model_flops = ft["model_flops_per_image"]

    def pair(ours, theirs, digits=2):
        if theirs is None:
            return f"{ours:.{digits}f} | - | "
        return f"{ours:.{digits}f} | {theirs:.{digits}f} | {ours / theirs:.2f}x"

    devices = r["flax_ddim"]["devices"]
    rows = [f"Machine: {r['machine']}. Model: {r['config']}. Medians of {len(ft['rounds'])} alternating rounds.",
            "", "| measure | flaxdiff (JAX) | diffusers (PyTorch) | ratio |", "| --- | --- | --- | --- |",
            f"| training images/s (batch {r['train_batch']}) | {pair(ft['images_per_sec'], tt['images_per_sec'])} |",
            f"| training images/s, diffusers with the same malloc tunable | "
            f"{pair(ft['images_per_sec'], tu['images_per_sec'])} |"]
    for key, label in (("ddim", f"DDIM 50 steps, {devices:.0f} devices as sample.py"),
                       ("ddim_one_device", "DDIM 50 steps, 1 device"),
                       ("ddpm", f"DDPM {r['ddpm_steps']} steps, {devices:.0f} devices")):
        theirs = r.get(f"torch_{key.split('_')[0]}", missing)["evals_per_sec"]
        rows.append(f"| sampling UNet evals/s, {label} (batch 16) | {pair(r[f'flax_{key}']['evals_per_sec'], theirs, 1)} |")
    rows += [f"| train-step compile (s) | {ft['compile_seconds']:.1f} | - | |",
             f"| sampler compile, DDPM 50 / 1000 steps (s) | {fd['compile_seconds_50']:.1f} / "
             f"{fd['compile_seconds_1000']:.1f} | - | {fd['compile_seconds_1000'] / fd['compile_seconds_50']:.2f}x |",
             f"| peak RSS, training (MB) | {pair(ft['peak_rss_mb'], tt['peak_rss_mb'], 0)} |",
             *(f"| peak RSS, DDIM sampling, {label} (MB) | "
               f"{pair(r[key]['peak_rss_mb'], r.get('torch_ddim', missing)['peak_rss_mb'], 0)} |"
               for key, label in (("flax_ddim", f"{devices:.0f} devices"), ("flax_ddim_one_device", "1 device"))),
             f"| XLA temporary buffer of the train step (MB) | {ft['temp_mb']:.0f} | - | |",
             f"| training FLOPs per image: the model (XLA cost analysis) / executed by flaxdiff | "
             f"{model_flops / 1e9:.2f} G / {ft['flops_per_image'] / 1e9:.2f} G | {model_flops / 1e9:.2f} G | |",
             f"| achieved model FLOP/s in training | {ft['images_per_sec'] * model_flops / 1e9:.1f} G | "
             + (f"{tt['images_per_sec'] * model_flops / 1e9:.1f} G | |" if tt['images_per_sec'] else "- | |")]
    if ft.get("mfu"):
        rows.append(f"| model FLOPs utilisation in training (of the devices' peak) | {ft['mfu']:.1%} | - | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
