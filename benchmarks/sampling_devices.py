"""Sampling on one CPU device, or on one CPU device per core (sample.py's rule, flaxdiff/host.py):
which is faster for which UNet? Per config of the speed matrix (plus two larger ones), flaxdiff's
sampling UNet evaluations/s and peak RSS both ways, in alternating rounds, each job a fresh process
of bench_speed.py's sampling worker (DDPM, the persistent compilation cache keeps compiles out of
the timings).

    python benchmarks/sampling_devices.py                         # every config, 2 rounds (~25 min)
    python benchmarks/sampling_devices.py --cells course,ddpm_64px --rounds 1

Results: benchmarks/results/sampling_devices.json and a markdown table on stdout (docs/speed.md).
The table's "work per device" column is what sample.py's rule looks at: host.unet_macs_per_image
(the UNet's estimated convolution multiply-adds per image) times the images each device samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_matrix import CELLS, DDPM_WIDTHS, cell_axes, describe, measure_cells, parse_cell_arguments, unet_config  # noqa: E402
from bench_speed import run_worker  # noqa: E402

RESULTS = HERE / "results" / "sampling_devices.json"
# beyond the matrix: the course UNet at 64 px, and the ddpm preset at 32 px
EXTRA_CELLS = {
    "course_64px": dict(widths=(64, 128, 128, 256), attention_at=(16, 8), groups=32, resolution=64, batch=16),
    "ddpm_32px": dict(widths=DDPM_WIDTHS, attention_at=(2,), groups=32, resolution=32, batch=16),
}


def axes_of(name: str) -> dict:
    return cell_axes(name) if name in CELLS else {**cell_axes("small"), **EXTRA_CELLS[name]}


def measure(name: str, args, cache_dir: str) -> dict:
    from flaxdiff.host import cpu_cores, cpu_devices_for

    config = unet_config(axes_of(name))
    sample = dict(sampler="ddpm", steps=args.steps, batch=args.batch, config=config)
    cache = {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    per_core = cpu_devices_for(args.batch)
    devices = {"one_device": 1, "per_core": per_core}
    rounds = {mode: [] for mode in devices}
    for _ in range(args.rounds):
        for mode, count in devices.items():  # forced either way (the rule itself is what this measures)
            rounds[mode].append(run_worker("flax_sample", True, extra_env={**cache, "JAX_NUM_CPU_DEVICES": str(count)},
                                           **sample))
    median = {mode: {key: statistics.median(r[key] for r in runs) for key in ("evals_per_sec", "peak_rss_mb")}
              for mode, runs in rounds.items()}
    devices = rounds["per_core"][0]["devices"]
    speedups = [p["evals_per_sec"] / o["evals_per_sec"] for p, o in zip(rounds["per_core"], rounds["one_device"])]
    return {"axes": axes_of(name), "config": config, "rounds": rounds, "median": median, "devices": devices,
            "cores": cpu_cores(),
            "per_core_speedup": {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)}}


def table(results: dict) -> str:
    from flaxdiff.host import PER_CORE_MAX_IMAGES, PER_CORE_MAX_MACS, unet_macs_per_image

    def work(cell):  # per device, with the per-core device count
        return unet_macs_per_image(cell["config"]) * results["batch"] / cell["devices"]

    lines = ["| config | UNet | work per device (GMAC) | one device: evals/s, peak MB | per core: evals/s, peak MB "
             "| per core / one device (spread) | sample.py's rule |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, c in sorted(results["cells"].items(), key=lambda item: work(item[1])):
        one, per = c["median"]["one_device"], c["median"]["per_core"]
        per_device = results["batch"] / c["devices"]
        s = c["per_core_speedup"]
        lines.append(f"| {name} | {describe(c['axes']).rsplit(' b', 1)[0]} | {work(c) / 1e9:.1f} "
                     f"| {one['evals_per_sec']:.1f}, {one['peak_rss_mb']:,.0f} "
                     f"| {per['evals_per_sec']:.1f}, {per['peak_rss_mb']:,.0f} ({c['devices']} devices) "
                     f"| {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) "
                     f"| {'one device' if per_device > PER_CORE_MAX_IMAGES or work(c) > PER_CORE_MAX_MACS else 'per core'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="DDPM steps per job (default: 10)")
    parser.add_argument("--batch", type=int, default=16, help="sampling batch (default: 16, sample.py's)")
    args, chosen = parse_cell_arguments(parser, [*CELLS, *EXTRA_CELLS], RESULTS, default_rounds=2)
    results = measure_cells(Path(args.output), chosen, lambda name, cache: measure(name, args, cache),
                            lambda name: describe(axes_of(name)),
                            lambda cell: f"per core / one device: {cell['per_core_speedup']['median']:.2f}x",
                            args.force, args.table_only, steps=args.steps, batch=args.batch)
    print(f"Machine: {results.get('machine')}; DDPM, batch {results.get('batch')}.\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
