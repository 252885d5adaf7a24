"""Where a training job's peak memory goes, flaxdiff against diffusers, stage by stage.

The speed matrix's peak RSS of training is above diffusers' for small batches and the `ddpm`
preset even when the programs come from the compilation cache (docs/speed.md). This runs each
side's training job of the matrix (bench_speed.py's workers: the same step, no EMA on either side)
and reads the process's resident memory after each stage:

* runtime: the libraries imported and their CPU backend started;
* state: the model, its optimizer state and one batch created (torch's AdamW creates its moments
  at the first step, so torch's "after step 1" below holds them, and its gradients are freed by
  zero_grad);
* flaxdiff: the train step compiled (from the compilation cache on the second of two runs, which
  is the one reported) and XLA's own accounting of the step program (`memory_analysis`: its
  arguments, the state and batch, and its temporaries: activations kept for the backward pass,
  gradients, and working space);
* the peak over the warm-up and the timed steps.

    python benchmarks/train_memory.py                   # 4 cells, ~6 minutes on 2 CPU cores
    python benchmarks/train_memory.py --cells ddpm_64px --gradient_checkpointing \
        --output benchmarks/results/train_memory_gradient_checkpointing.json

Results: benchmarks/results/train_memory.json and a markdown table on stdout (docs/speed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DEFAULT_CELLS = ["small_batch_16", "course", "course_batch_16", "ddpm_64px"]


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tree_mb(tree) -> float:
    import jax

    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree)) / 2**20


def flax_stages(config: dict, batch: int, steps: int, gradient_checkpointing: bool = False) -> dict:
    import jax

    from bench_speed import flax_training, peak_rss_mb
    from flaxdiff.host import release_free_memory
    from flaxdiff.schedule import NoiseSchedule
    from flaxdiff.training.step import make_train_step
    from flaxdiff.unet import UNet2D  # noqa: F401  (imported before the runtime's reading, as torch's libraries are)

    jax.devices()
    stages = {"runtime": rss_mb()}
    graphdef, mesh, step_config, state, batch_array = flax_training(
        batch, config=config, gradient_checkpointing=gradient_checkpointing)
    stages["state"] = rss_mb()
    compiled = make_train_step(graphdef, NoiseSchedule.from_config(), step_config, mesh, seed=0).lower(
        state, batch_array).compile()
    release_free_memory()  # as train.py does after compiling
    stages["compiled"] = rss_mb()
    analysis = compiled.memory_analysis()
    state, metrics = compiled(state, batch_array)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_array)
        jax.block_until_ready(metrics)
    stages["peak"] = peak_rss_mb()
    return {"stages_mb": stages, "state_mb": tree_mb(state), "images_per_sec": batch * steps / (time.perf_counter() - start),
            "xla_arguments_mb": analysis.argument_size_in_bytes / 2**20, "xla_temp_mb": analysis.temp_size_in_bytes / 2**20}


def torch_stages(config: dict, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional  # noqa: F401  (the libraries the step uses, imported before the runtime's reading)
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401

    from bench_speed import peak_rss_mb, torch_training

    stages = {"runtime": rss_mb()}
    model, optimizer, one_step = torch_training(batch, config=config)  # bench_speed.torch_train's step
    stages["state"] = rss_mb()
    one_step()
    stages["after step 1"] = rss_mb()
    for _ in range(steps):
        one_step()
    stages["peak"] = peak_rss_mb()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v)) / 2**20
    return {"stages_mb": stages, "state_mb": params + moments}


def run(side: str, cell: str, steps: int, env: dict, extra: tuple = ()) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--cells", cell, "--steps", str(steps), *extra],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows = ["| cell | config | flaxdiff runtime / + state / + step compiled / peak (MB) | state, XLA temporaries (MB) "
            "| diffusers runtime / + model and batch / after step 1 / peak (MB) | state (MB) | peak ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        f, t = r["flaxdiff"], r["diffusers"]
        fs, ts = f["stages_mb"], t["stages_mb"]
        rows.append(f"| {name} | {r['config']} | {fs['runtime']:.0f} / {fs['state']:.0f} / {fs['compiled']:.0f} / "
                    f"{fs['peak']:.0f} | {f['state_mb']:.0f}, {f['xla_temp_mb']:.0f} | {ts['runtime']:.0f} / "
                    f"{ts['state']:.0f} / {ts['after step 1']:.0f} / {ts['peak']:.0f} | {t['state_mb']:.0f} "
                    f"| {fs['peak'] / ts['peak']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                        help=f"comma-separated speed-matrix cells (default: {','.join(DEFAULT_CELLS)})")
    parser.add_argument("--steps", type=int, default=2, help="training steps after the first (default: 2)")
    parser.add_argument("--output", default=str(HERE / "results" / "train_memory.json"),
                        help="results file (default: benchmarks/results/train_memory.json)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="flaxdiff's UNet with --gradient_checkpointing, as train.py's flag builds it "
                             "(recomputes activations in the backward pass); diffusers' job unchanged")
    parser.add_argument("--worker", choices=["flaxdiff", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench_matrix import cell_axes, describe, unet_config

    if args.worker:
        axes = cell_axes(args.cells)
        if args.worker == "flaxdiff":
            result = flax_stages(unet_config(axes), axes["batch"], args.steps, args.gradient_checkpointing)
        else:
            result = torch_stages(unet_config(axes), axes["batch"], args.steps)
        print(json.dumps(result))
        return 0
    from bench_speed import machine
    from flaxdiff.host import TUNABLE

    results = {}
    with tempfile.TemporaryDirectory() as cache:
        # flaxdiff as train.py runs it: the malloc tunable and the persistent compilation cache
        flax_env = {**os.environ, "GLIBC_TUNABLES": TUNABLE, "JAX_COMPILATION_CACHE_DIR": cache,
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for name in args.cells.split(","):
            start = time.perf_counter()
            extra = ("--gradient_checkpointing",) if args.gradient_checkpointing else ()
            run("flaxdiff", name, args.steps, flax_env, extra)  # fills the cache
            results[name] = {"config": describe(cell_axes(name)), "gradient_checkpointing": args.gradient_checkpointing,
                             "flaxdiff": run("flaxdiff", name, args.steps, flax_env, extra),
                             "diffusers": run("diffusers", name, args.steps, dict(os.environ))}
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps({"machine": machine(), "cells": results}, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
