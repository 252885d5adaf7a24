"""The speed matrix: flaxdiff against PyTorch diffusers over the UNet configs people train, not
only the course's. Per cell: training images/s and sampling UNet evaluations/s on both sides, in
alternating rounds (the medians, and the spread of the flaxdiff/diffusers ratio over the rounds),
achieved model GFLOP/s in training, peak RSS of each job, and the three most expensive operations of
each side's training step from a profile (jax.profiler's trace of XLA's executed instructions;
torch.profiler's aten ops).

    python benchmarks/bench_matrix.py                      # every cell, 3 rounds (~1 hour on 2 CPU cores)
    python benchmarks/bench_matrix.py --cells small,small_heads_none --rounds 2
    python benchmarks/bench_matrix.py --list               # the cells and their configs
    python benchmarks/bench_matrix.py --table_only --before benchmarks/results/speed_matrix_before.json

The cells vary one axis at a time around `small` (the issue's 1.6 M-parameter UNet: widths
(32, 64, 64), 2 layers per block, attention at 16x16 with head dim 8, 8 norm groups, 32 px, training
batch 64), then the course UNet and train_unconditional's `ddpm` preset. Each measurement is a fresh
subprocess of bench_speed.py's workers (so each peak RSS is the job's own), flaxdiff as train.py and
sample.py run it (malloc tunable; sampling on the CPU devices sample.py picks), diffusers as
train_unconditional.py and DDPMPipeline run it. The persistent compilation cache keeps JAX's
compiles out of later rounds; compile time is not part of any figure here (bench_speed.py reports it).

Results: benchmarks/results/speed_matrix.json (every round kept; a rerun skips cells already there
unless --force) and a markdown table on stdout, the one in docs/speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_speed import machine, run_worker  # noqa: E402

RESULTS = HERE / "results" / "speed_matrix.json"
BASE = dict(widths=(32, 64, 64), layers=2, attention_at=(16,), head_dim=8, groups=8, resolution=32, batch=64)
DDPM_WIDTHS = (128, 128, 256, 256, 512, 512)
# name -> the axes that differ from BASE
CELLS = {
    "small": {},
    "small_heads_none": dict(head_dim=None),
    "small_heads_32": dict(head_dim=32),
    "small_groups_32": dict(groups=32),
    "small_layers_1": dict(layers=1),
    "small_attention_8": dict(attention_at=(8,)),
    "small_no_attention": dict(attention_at=()),
    "small_batch_16": dict(batch=16),
    "small_64px": dict(resolution=64, attention_at=(16,)),
    "course": dict(widths=(64, 128, 128, 256), attention_at=(8, 4), groups=32),
    "course_batch_16": dict(widths=(64, 128, 128, 256), attention_at=(8, 4), groups=32, batch=16),
    "ddpm_64px": dict(widths=DDPM_WIDTHS, attention_at=(4,), groups=32, resolution=64, batch=16),
    # the same preset at 32 px (train_unconditional --resolution 32): its lowest level is 1x1
    "ddpm_32px": dict(widths=DDPM_WIDTHS, attention_at=(2,), groups=32, resolution=32, batch=16),
}


def cell_axes(name: str) -> dict:
    return {**BASE, **CELLS[name]}


def unet_config(axes: dict) -> dict:
    """diffusers' UNet2DModel config for a cell: attention blocks at the levels whose resolution is
    in attention_at (the up path mirrors the down path, as in the course and ddpm configs)."""
    levels = [axes["resolution"] >> i for i in range(len(axes["widths"]))]
    attends = [size in axes["attention_at"] for size in levels]
    return dict(sample_size=axes["resolution"], in_channels=3, out_channels=3, layers_per_block=axes["layers"],
                block_out_channels=list(axes["widths"]), attention_head_dim=axes["head_dim"],
                norm_num_groups=axes["groups"],
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)])


def measure_cell(name: str, args, cache_dir: str) -> dict:
    axes = cell_axes(name)
    config = unet_config(axes)
    train = dict(batch=axes["batch"], steps=args.train_steps, config=config)
    sample = dict(sampler="ddpm", steps=args.sample_steps, batch=args.sample_batch, config=config)
    cache = {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    jobs = {"flax_train": ("flax_train", True, False, train), "torch_train": ("torch_train", False, False, train),
            "flax_sample": ("flax_sample", True, True, sample), "torch_sample": ("torch_sample", False, False, sample)}
    rounds = {job: [] for job in jobs}
    for index in range(args.rounds):
        for job, (worker, tuned, per_core, kwargs) in jobs.items():
            # the first round profiles each side's training step, after its timed steps
            extra = dict(profile=True) if index == 0 and job.endswith("train") else {}
            rounds[job].append(run_worker(worker, tuned, per_core=per_core, extra_env=cache, **kwargs, **extra))
    return {"axes": axes, "config": config, "rounds": rounds, **summarise(rounds)}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rounds: dict) -> dict:
    """Medians per job, and the flaxdiff/diffusers ratio of each round (the rounds alternate, so
    round i's ratio compares measurements taken minutes apart)."""
    train = [f["images_per_sec"] / t["images_per_sec"] for f, t in zip(rounds["flax_train"], rounds["torch_train"])]
    sample = [f["evals_per_sec"] / t["evals_per_sec"] for f, t in zip(rounds["flax_sample"], rounds["torch_sample"])]
    flops = rounds["flax_train"][0]["model_flops_per_image"]

    def median(job, key):
        return statistics.median(r[key] for r in rounds[job])
    return {
        "train_ratio": spread(train), "sample_ratio": spread(sample),
        "flax_train_images_per_sec": median("flax_train", "images_per_sec"),
        "torch_train_images_per_sec": median("torch_train", "images_per_sec"),
        "flax_sample_evals_per_sec": median("flax_sample", "evals_per_sec"),
        "torch_sample_evals_per_sec": median("torch_sample", "evals_per_sec"),
        "model_gflops_per_image": flops / 1e9,
        "flax_train_gflops_per_sec": median("flax_train", "images_per_sec") * flops / 1e9,
        "torch_train_gflops_per_sec": median("torch_train", "images_per_sec") * flops / 1e9,
        "train_memory_ratio": median("flax_train", "peak_rss_mb") / median("torch_train", "peak_rss_mb"),
        "sample_memory_ratio": median("flax_sample", "peak_rss_mb") / median("torch_sample", "peak_rss_mb"),
        "flax_top_ops": rounds["flax_train"][0].get("top_ops", []),
        "torch_top_ops": rounds["torch_train"][0].get("top_ops", []),
    }


def describe(axes: dict) -> str:
    attention = "/".join(f"{a}" for a in axes["attention_at"]) or "none"
    return (f"({', '.join(map(str, axes['widths']))}) L{axes['layers']} attn {attention} hd {axes['head_dim']} "
            f"g{axes['groups']} {axes['resolution']}px b{axes['batch']}")


def ratio(r: dict) -> str:
    """A ratio's median with the range of its rounds."""
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def table(results: dict) -> str:
    def ops(top):
        return "; ".join(f"{o['op'].replace('|', '/')} {o['share']:.0%}" for o in top)
    lines = ["| cell | config | training img/s flaxdiff / diffusers | ratio (spread) | sampling evals/s | ratio (spread) "
             "| GFLOP/s training | peak RSS ratio train / sample | flaxdiff top ops (training) | diffusers top ops |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, c in results["cells"].items():
        lines.append(
            f"| {name} | {describe(c['axes'])} | {c['flax_train_images_per_sec']:.1f} / {c['torch_train_images_per_sec']:.1f} "
            f"| {ratio(c['train_ratio'])} | {c['flax_sample_evals_per_sec']:.0f} / {c['torch_sample_evals_per_sec']:.0f} "
            f"| {ratio(c['sample_ratio'])} | {c['flax_train_gflops_per_sec']:.0f} / {c['torch_train_gflops_per_sec']:.0f} "
            f"| {c['train_memory_ratio']:.2f} / {c['sample_memory_ratio']:.2f} | {ops(c['flax_top_ops'])} "
            f"| {ops(c['torch_top_ops'])} |")
    return "\n".join(lines)


def before_after(before: dict, after: dict) -> str:
    """Each cell's medians in two results files (say, a commit before a fix and after it), with the
    spread of each."""
    lines = ["| cell | training before | after | sampling before | after | peak RSS train before | after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, c in after["cells"].items():
        b = before["cells"].get(name)
        if b:
            lines.append(f"| {name} | {ratio(b['train_ratio'])} | {ratio(c['train_ratio'])} | {ratio(b['sample_ratio'])} "
                         f"| {ratio(c['sample_ratio'])} | {b['train_memory_ratio']:.2f} | {c['train_memory_ratio']:.2f} |")
    return "\n".join(lines)


def parse_cell_arguments(parser: argparse.ArgumentParser, cells: list[str], results: Path, default_rounds: int):
    """The flags every cell benchmark shares, parsed; returns (args, the chosen cell names)."""
    parser.add_argument("--cells", default=",".join(cells), help=f"comma-separated cells (default: all): "
                        f"{', '.join(cells)}")
    parser.add_argument("--rounds", type=int, default=default_rounds,
                        help=f"alternating rounds per cell (default: {default_rounds})")
    parser.add_argument("--force", action="store_true", help="measure cells already in the results file again")
    parser.add_argument("--output", default=str(results), help=f"results file (default: {results})")
    parser.add_argument("--table_only", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args()
    names = args.cells.split(",")
    unknown = [n for n in names if n not in cells]
    if unknown:
        parser.error(f"unknown cells {unknown}; choose from {', '.join(cells)}")
    return args, names


def measure_cells(output: Path, names: list[str], measure, label, summary_line, force: bool = False,
                  table_only: bool = False, **header) -> dict:
    """The results file's cells, after measuring those of `names` it lacks (all with `force`):
    measure(name, cache_dir) -> the cell's dict, written to `output` after each cell (so an
    interrupted run resumes), sharing one persistent compilation cache."""
    results = json.loads(output.read_text()) if output.exists() else {}
    results.setdefault("cells", {})
    if table_only:
        return results
    results.update(machine=machine(), **header)
    with tempfile.TemporaryDirectory(prefix="flaxdiff-bench-cache-") as cache_dir:
        for name in names:
            if name in results["cells"] and not force:
                continue
            print(f"{name}: {label(name)}", file=sys.stderr, flush=True)
            results["cells"][name] = measure(name, cache_dir)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1) + "\n")
            print(f"  {summary_line(results['cells'][name])}", file=sys.stderr, flush=True)
    return results


def summary_line(cell: dict) -> str:
    return f"training {cell['train_ratio']['median']:.2f}x, sampling {cell['sample_ratio']['median']:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cells and their UNet configs, then exit")
    parser.add_argument("--train_steps", type=int, default=4, help="timed training steps per round, after one "
                        "warm-up step (default: 4)")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDPM steps per sampling round (default: 25)")
    parser.add_argument("--sample_batch", type=int, default=16, help="sampling batch (default: 16)")
    parser.add_argument("--before", help="a results file of an earlier commit: print each cell's ratios before "
                        "(that file) and after (--output) too")
    args, names = parse_cell_arguments(parser, list(CELLS), RESULTS, default_rounds=3)
    if args.list:
        for name in names:
            print(f"{name}: {describe(cell_axes(name))}\n  {json.dumps(unet_config(cell_axes(name)))}")
        return 0
    results = measure_cells(Path(args.output), names, lambda name, cache: measure_cell(name, args, cache),
                            lambda name: describe(cell_axes(name)), summary_line, args.force, args.table_only)
    print(f"Machine: {results.get('machine')}.\n")
    print(table(results))
    if args.before:
        print("\n" + before_after(json.loads(Path(args.before).read_text()), results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
