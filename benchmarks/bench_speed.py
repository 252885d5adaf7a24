"""flaxdiff against PyTorch diffusers, in one run on this machine: training images/s, sampling
UNet evaluations/s, compile times, peak memory and FLOPs.

    python benchmarks/bench_speed.py                 # the course UNet, 32 px (about 13 minutes on 2 CPU cores)
    python benchmarks/bench_speed.py --quick         # fewer steps: a smoke run of the same table

Every measurement runs in a fresh subprocess, so each peak resident memory is that job's own.
Both sides use the same UNet config, batch and float32 weights; torch with its default threads,
JAX on its default backend. Compile time is reported apart from steady-state speed.
Results go to stdout (a markdown table) and benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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


# --------------------------------------------------------------------------- workers (one per subprocess)
def flax_train(batch: int, steps: int) -> dict:
    import numpy as np
    import jax
    from flax import nnx

    from flaxdiff import parallel
    from flaxdiff.schedule import NoiseSchedule
    from flaxdiff.training import StepConfig, create_train_state, make_train_step
    from flaxdiff.unet import UNet2D

    model = UNet2D(COURSE, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    mesh = parallel.make_mesh()
    config = StepConfig(total_steps=1000, lr_warmup_steps=0)
    state = parallel.replicate(create_train_state(nnx.to_pure_dict(params), config), mesh)
    step = make_train_step(graphdef, NoiseSchedule.from_config(), config, mesh, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (1, 1, batch, 32, 32, 3), dtype=np.uint8)
    batch_array = parallel.global_batch(images, mesh, batch_axis=2)
    start = time.perf_counter()
    compiled = step.lower(state, batch_array).compile()
    compile_seconds = time.perf_counter() - start
    flops = compiled.cost_analysis()["flops"]
    state, metrics = step(state, batch_array)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch_array)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {"images_per_sec": batch * steps / seconds, "compile_seconds": compile_seconds,
            "flops_per_image": flops / batch, "flops_per_sec": flops * steps / seconds, "peak_rss_mb": peak_rss_mb()}


def torch_train(batch: int, steps: int) -> dict:
    """A faithful transcription of train_unconditional.py's step (epsilon loss, clip 1.0, AdamW)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**COURSE).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    clean = torch.rand(batch, 3, 32, 32) * 2 - 1

    def one_step():
        noise = torch.randn(clean.shape)
        timesteps = torch.randint(0, 1000, (batch,)).long()
        loss = F.mse_loss(model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    seconds = time.perf_counter() - start
    return {"images_per_sec": batch * steps / seconds, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def flax_sample(sampler: str, steps: int, batch: int, compile_only: tuple = ()) -> dict:
    import jax
    from flax import nnx

    from flaxdiff.pipeline import DiffusionPipeline, _sample_program
    from flaxdiff.unet import UNet2D

    pipe = DiffusionPipeline(UNet2D(COURSE, rngs=nnx.Rngs(0)), {"_class_name": "DDPMScheduler"})
    plan = pipe.plan(sampler, steps)
    graphdef, state = nnx.split(pipe.unet)
    latents = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    key = jax.random.key(1)
    result = {}
    for count in compile_only:  # compile times of the same sampler at other step counts
        other = pipe.plan(sampler, count)
        start = time.perf_counter()
        _sample_program.lower(graphdef, state, other, latents, None, key).compile()
        result[f"compile_seconds_{count}"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = _sample_program.lower(graphdef, state, plan, latents, None, key).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, plan, latents, None, key))
    seconds = time.perf_counter() - start
    return {**result, "evals_per_sec": batch * steps / seconds, "compile_seconds": compile_seconds,
            "peak_rss_mb": peak_rss_mb()}


def torch_sample(sampler: str, steps: int, batch: int) -> dict:
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**COURSE).eval()
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
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
def run_worker(name: str, **kwargs) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    print(f"  running {name} {kwargs} ...", file=sys.stderr, flush=True)
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(output.strip().splitlines()[-1])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax
    import torch
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}; jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke run of the same table")
    parser.add_argument("--ddpm_run_steps", type=int, default=200, help="DDPM steps timed for evals/s (the "
                        "rate does not depend on the count; the 1000-step program's compile time is measured "
                        "either way)")
    parser.add_argument("--train_batch", type=int, default=64)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--output", default=str(HERE / "results" / "speed.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return 0

    train_steps = 2 if args.quick else 5
    ddpm_steps = 20 if args.quick else args.ddpm_run_steps
    r = {"machine": machine(), "config": "course UNet (64, 128, 128, 256), 32x32, float32"}
    r["flax_train"] = run_worker("flax_train", batch=args.train_batch, steps=train_steps)
    r["torch_train"] = run_worker("torch_train", batch=args.train_batch, steps=train_steps)
    for sampler, steps in (("ddim", 50), ("ddpm", ddpm_steps)):
        r[f"flax_{sampler}"] = run_worker("flax_sample", sampler=sampler, steps=steps, batch=args.sample_batch,
                                          compile_only=(50, 1000) if sampler == "ddpm" else ())
        r[f"torch_{sampler}"] = run_worker("torch_sample", sampler=sampler, steps=steps, batch=args.sample_batch)
    r["ddpm_steps"] = ddpm_steps
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


def table(r: dict) -> str:
    ft, tt = r["flax_train"], r["torch_train"]
    rows = [f"Machine: {r['machine']}. Model: {r['config']}.", "",
            "| measure | flaxdiff (JAX) | diffusers (PyTorch) | ratio |", "| --- | --- | --- | --- |",
            f"| training images/s (batch 64) | {ft['images_per_sec']:.2f} | {tt['images_per_sec']:.2f} | "
            f"{ft['images_per_sec'] / tt['images_per_sec']:.2f}x |"]
    for sampler, label in (("ddim", "DDIM 50 steps"), ("ddpm", f"DDPM {r['ddpm_steps']} steps")):
        f, t = r[f"flax_{sampler}"], r[f"torch_{sampler}"]
        rows.append(f"| sampling UNet evals/s, {label} (batch 16) | {f['evals_per_sec']:.1f} | "
                    f"{t['evals_per_sec']:.1f} | {f['evals_per_sec'] / t['evals_per_sec']:.2f}x |")
    rows += [f"| train-step compile (s) | {ft['compile_seconds']:.1f} | - | |",
             f"| sampler compile, DDPM 50 / 1000 steps (s) | {r['flax_ddpm']['compile_seconds_50']:.1f} / "
             f"{r['flax_ddpm']['compile_seconds_1000']:.1f} | - | "
             f"{r['flax_ddpm']['compile_seconds_1000'] / r['flax_ddpm']['compile_seconds_50']:.2f}x |",
             f"| peak RSS, training (MB) | {ft['peak_rss_mb']:.0f} | {tt['peak_rss_mb']:.0f} | "
             f"{ft['peak_rss_mb'] / tt['peak_rss_mb']:.2f}x |",
             f"| peak RSS, DDPM sampling (MB) | {r['flax_ddpm']['peak_rss_mb']:.0f} | "
             f"{r['torch_ddpm']['peak_rss_mb']:.0f} | "
             f"{r['flax_ddpm']['peak_rss_mb'] / r['torch_ddpm']['peak_rss_mb']:.2f}x |",
             f"| training FLOPs per image (XLA cost analysis) | {ft['flops_per_image'] / 1e9:.2f} G | same model | |",
             f"| achieved training FLOP/s | {ft['flops_per_sec'] / 1e9:.1f} G | "
             f"{tt['images_per_sec'] * ft['flops_per_image'] / 1e9:.1f} G | |"]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
