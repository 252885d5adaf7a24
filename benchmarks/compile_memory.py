"""How much of flaxdiff's peak memory is the compiler's? Per cell of the speed matrix, flaxdiff's
training and sampling jobs (bench_speed.py's workers, as bench_matrix.py runs them) twice with one
persistent compilation cache: the first run compiles its programs (a user's first run of a
config), the second loads them from the cache (every later run: train.py and sample.py keep the
cache by default). Peak RSS of each against diffusers' from a speed-matrix results file, measured
on the same machine; diffusers compiles nothing, so its figure serves both.

    python benchmarks/compile_memory.py --matrix benchmarks/results/speed_matrix_amd_epyc.json   # ~25 min on 2 cores
    python benchmarks/compile_memory.py --cells small,course --rounds 1

Results: benchmarks/results/compile_memory.json and a markdown table on stdout (docs/speed.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_matrix import CELLS, cell_axes, describe, measure_cells, parse_cell_arguments, unet_config  # noqa: E402
from bench_speed import run_worker  # noqa: E402

RESULTS = HERE / "results" / "compile_memory.json"
RUNS = ("compiling", "cached")


def measure(name: str, args, cache_dir: str) -> dict:
    """args.rounds x (the first run, which compiles; the second, from the cache), each with a cache of
    its own so that every first run compiles."""
    axes = cell_axes(name)
    config = unet_config(axes)
    rows = []
    for index in range(args.rounds):
        cache = {"JAX_COMPILATION_CACHE_DIR": f"{cache_dir}/{name}-{index}",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for run in RUNS:
            train = run_worker("flax_train", True, extra_env=cache, batch=axes["batch"], steps=args.train_steps,
                               config=config)
            sample = run_worker("flax_sample", True, per_core=True, extra_env=cache, sampler="ddpm",
                                steps=args.sample_steps, batch=args.sample_batch, config=config)
            rows.append({"run": run, "train_peak_rss_mb": train["peak_rss_mb"], "train_seconds_to_compile":
                         train["compile_seconds"], "xla_temp_mb": train["temp_mb"],
                         "sample_peak_rss_mb": sample["peak_rss_mb"], "sample_seconds_to_compile":
                         sample["compile_seconds"]})
    return {"axes": axes, "rows": rows, **{f"{key}_{run}": statistics.median(r[key] for r in rows if r["run"] == run)
                                          for key in ("train_peak_rss_mb", "sample_peak_rss_mb") for run in RUNS}}


def table(results: dict, matrix: dict) -> str:
    lines = ["| cell | config | training peak RSS, flaxdiff compiling / cached / diffusers (MB) | ratio compiling / cached "
             "| sampling peak RSS, compiling / cached / diffusers (MB) | ratio compiling / cached |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, c in results["cells"].items():
        torch = matrix["cells"].get(name)
        if torch is None:
            continue
        rss = {job: statistics.median(r["peak_rss_mb"] for r in torch["rounds"][job])
               for job in ("torch_train", "torch_sample")}
        train = [c[f"train_peak_rss_mb_{run}"] for run in RUNS]
        sample = [c[f"sample_peak_rss_mb_{run}"] for run in RUNS]
        lines.append(f"| {name} | {describe(c['axes'])} | {train[0]:.0f} / {train[1]:.0f} / {rss['torch_train']:.0f} "
                     f"| {train[0] / rss['torch_train']:.2f} / {train[1] / rss['torch_train']:.2f} "
                     f"| {sample[0]:.0f} / {sample[1]:.0f} / {rss['torch_sample']:.0f} "
                     f"| {sample[0] / rss['torch_sample']:.2f} / {sample[1] / rss['torch_sample']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default=str(HERE / "results" / "speed_matrix.json"),
                        help="the speed-matrix results file whose diffusers peak RSS to compare with (measured on "
                        "this machine; default: %(default)s)")
    parser.add_argument("--train_steps", type=int, default=3, help="timed training steps per job (default: 3)")
    parser.add_argument("--sample_steps", type=int, default=20, help="DDPM steps per sampling job (default: 20)")
    parser.add_argument("--sample_batch", type=int, default=16, help="sampling batch (default: 16)")
    args, names = parse_cell_arguments(parser, list(CELLS), RESULTS, default_rounds=1)
    matrix = json.loads(Path(args.matrix).read_text())
    results = measure_cells(Path(args.output), names, lambda name, cache: measure(name, args, cache),
                            lambda name: describe(cell_axes(name)),
                            lambda c: (f"training {c['train_peak_rss_mb_compiling']:.0f} -> "
                                       f"{c['train_peak_rss_mb_cached']:.0f} MB, sampling "
                                       f"{c['sample_peak_rss_mb_compiling']:.0f} -> {c['sample_peak_rss_mb_cached']:.0f} MB"),
                            args.force, args.table_only, matrix=args.matrix)
    print(f"Machine: {results.get('machine')}; diffusers from {args.matrix}.\n")
    print(table(results, matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
