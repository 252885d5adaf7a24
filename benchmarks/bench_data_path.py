"""Where batches come from: the dataset in device memory (gathered there) against batches
gathered on the host and prefetched, in one run on this machine.

    python benchmarks/bench_data_path.py                # the default train.py job, 600 steps each way
    python benchmarks/bench_data_path.py --steps 200 --train_batch_size 64

Each way runs train.py in its own subprocess with the same flags except --dataset_on_device, and
reports the steady-state training images/s train.py logs (compile and sampling excluded), the
peak resident memory, and whether the final weights are bit for bit the same.
Results go to stdout (a markdown table) and benchmarks/results/data_path.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def run(mode: str, out: Path, args, extra: list[str]) -> dict:
    flags = ["--dataset_on_device", mode, "--output_dir", str(out), "--max_train_steps", str(args.steps),
             "--logging_steps", str(args.logging_steps), "--checkpointing_steps", str(10**9),
             "--save_images_epochs", str(10**6), "--save_model_epochs", str(10**6),
             "--train_batch_size", str(args.train_batch_size), *extra]
    start = time.perf_counter()
    log = out.parent / f"{mode}.log"
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, stdout=f,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak resident memory
    wall = time.perf_counter() - start
    stdout = log.read_text()
    if status:
        sys.exit(f"train.py --dataset_on_device {mode} failed:\n{stdout[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["images_per_sec"] for row in rows[1:] if row.get("images_per_sec")]  # the first window warms up
    placement = next((line for line in stdout.splitlines() if " images of " in line), "")
    return {"mode": mode, "images_per_sec_median": statistics.median(rates), "images_per_sec_windows": rates,
            "wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "placement": placement.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default: 600)")
    parser.add_argument("--logging_steps", type=int, default=50, help="images/s window (default: 50 steps)")
    parser.add_argument("--train_batch_size", type=int, default=8, help="global batch (default: 8, train.py's "
                        "default on the built-in dataset)")
    parser.add_argument("extra", nargs="*", help="more train.py flags after --, e.g. -- --model_preset course")
    args = parser.parse_args()
    from safetensors.numpy import load_file

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("no", "yes"):
            results.append(run(mode, Path(tmp) / mode, args, args.extra))
            print(f"--dataset_on_device {mode}: {results[-1]['images_per_sec_median']:.1f} images/s", flush=True)
        a, b = (load_file(str(Path(tmp) / mode / WEIGHTS)) for mode in ("no", "yes"))
        same = all(a[k].tobytes() == b[k].tobytes() for k in a)
    host, device = results
    import jax
    machine = f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} " \
              f"device(s), jax {jax.__version__}"
    print(f"\nmachine: {machine}; {args.steps} steps, global batch {args.train_batch_size} {' '.join(args.extra)}")
    print("| batches from | training images/s (median of windows) | peak RSS | wall time of the run |")
    print("| --- | --- | --- | --- |")
    for name, r in (("host (prefetch thread)", host), ("device memory (gather on device)", device)):
        print(f"| {name} | {r['images_per_sec_median']:.1f} | {r['peak_rss_mb']:.0f} MB | {r['wall_seconds']:.0f} s |")
    print(f"ratio device/host: {device['images_per_sec_median'] / host['images_per_sec_median']:.3f}; "
          f"final weights bit for bit equal: {same}")
    out = HERE / "results" / "data_path.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "host": host, "device": device,
                               "bitwise_equal": same}, indent=2) + "\n")


if __name__ == "__main__":
    main()
