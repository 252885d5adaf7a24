"""`python -m flaxdiff.recipes`: find a good training recipe, as Unit 1's project asks.

    python -m flaxdiff.recipes --output_dir recipes-shapes --images_seen 20000 \\
        --grid model_preset=tiny,course --grid learning_rate=1e-3,3e-4 -- --use_ema

Every combination of the `--grid` values is a recipe; each trains with train.py's code on the same
data for the same number of images seen (equal compute), scoring held-out bits/dim of its EMA and
training weights several times along the way (--validation_split, the same images and draws for
every recipe, so their values compare). A recipe that sets no --lr_warmup_steps warms up for
train.py's default or a tenth of its steps, whichever is fewer. Flags after `--` go to every run.
Each recipe is a normal train.py output folder under --output_dir; an interrupted sweep continues
where it stopped (finished recipes are kept, an interrupted one resumes from its last checkpoint).
At the end: results.md and results.json (one row per recipe: final held-out bits/dim, images seen,
FLOPs, time) and bpd_vs_images.png (held-out bits/dim against images seen and against training
FLOPs, one line per recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

from .data import BUILTIN
from .hub import RUN_RECORD_FILE
from .training.options import TrainOptions, build_parser

RESULTS = "results.json"


@dataclasses.dataclass
class Recipe:
    settings: dict  # flag -> value, the grid's choices for this recipe
    options: TrainOptions

    @property
    def name(self) -> str:
        """The run folder's name: flag=value pairs, a path value by its last part (a config folder's name)."""
        return ",".join(f"{k}={_short(v)}" for k, v in self.settings.items()) or "base"


def _short(value: str) -> str:
    path = Path(value)
    if len(path.parts) < 2:
        return value
    return path.parent.name if path.name == "config.json" else path.name


def parse_grid(entries: list[str]) -> dict[str, list[str]]:
    """--grid flag=v1,v2 ... -> {flag: [v1, v2]}; each flag a train.py flag."""
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    grid = {}
    for entry in entries:
        name, _, values = entry.partition("=")
        name = name.strip().lstrip("-")
        if name not in fields or not values:
            raise ValueError(f"--grid {entry!r}: give a train.py flag and its values, e.g. "
                             "--grid learning_rate=1e-3,3e-4")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def recipes(grid: dict[str, list[str]], base_args: list[str], output_dir: Path, images_seen: int,
            validation_points: int) -> list[Recipe]:
    """Every combination of the grid, as TrainOptions parsed like train.py parses its flags."""
    from .training.options import resolve_options

    parser = build_parser()
    out = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        args = [*base_args, *itertools.chain.from_iterable((f"--{k}", v) for k, v in settings.items())]
        opts = TrainOptions(**vars(parser.parse_args(args)))
        recipe = Recipe(settings, opts)
        opts.output_dir = str(output_dir / recipe.name)
        resolved = resolve_options(opts)
        step_images = resolved.train_batch_size * resolved.gradient_accumulation_steps
        opts.max_train_steps = max(1, images_seen // step_images)
        if opts.lr_warmup_steps is None:
            opts.lr_warmup_steps = sweep_warmup(resolved.lr_warmup_steps, opts.max_train_steps)
        if opts.validation_split is None:
            if resolved.dataset != BUILTIN:
                raise ValueError("recipes are compared on held-out images: pass -- --validation_split (a split of "
                                 "the dataset, or a fraction of its images such as 0.1)")
            opts.validation_split = "test"
        opts.validation_steps = opts.validation_steps or max(1, opts.max_train_steps // validation_points)
        opts.checkpointing_steps = min(opts.checkpointing_steps, opts.validation_steps * 2)
        opts.save_model_epochs = opts.save_images_epochs = 10**6  # the end only (and its grid)
        out.append(recipe)
    names = [r.name for r in out]
    if len(set(names)) < len(names):
        raise ValueError(f"two recipes would share a run folder ({', '.join(sorted(set(n for n in names if names.count(n) > 1)))}): "
                         "give the --grid values distinct last path parts")
    return out


def sweep_warmup(default: int, steps: int) -> int:
    """The warmup of a recipe that does not set one: train.py's default, but at most a tenth of the
    run. Sweeps are short, and diffusers' 500 warmup steps against a 400-step run would leave the
    learning rate rising to the end; a tenth of each run's steps is the same share of the images
    for every batch size, so recipes still compare at equal compute."""
    return min(default, max(1, steps // 10))


def finished(recipe: Recipe) -> bool:
    rows = read_rows(Path(recipe.options.output_dir))
    return any(r.get("step") == recipe.options.max_train_steps and "val_bpd" in r for r in rows) and \
        (Path(recipe.options.output_dir) / "model_index.json").exists()


def read_rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_recipe(recipe: Recipe, log=print) -> None:
    from .training import train

    folder = Path(recipe.options.output_dir)
    opts = dataclasses.replace(recipe.options)
    if (folder / "checkpoints").exists():
        opts.resume_from_checkpoint = "latest"  # an interrupted recipe continues
    elif folder.exists():
        opts.overwrite_output_dir = True  # started, but nothing to resume from
    log(f"== recipe {recipe.name}: {opts.max_train_steps} steps")
    train(opts, log=log)


def summarize(recipe: Recipe) -> dict:
    rows = read_rows(Path(recipe.options.output_dir))
    record = json.loads((Path(recipe.options.output_dir) / RUN_RECORD_FILE).read_text())
    options = record["options"]
    step_images = options["train_batch_size"] * options["gradient_accumulation_steps"]
    trained = [r for r in rows if "loss" in r]
    flops_per_image = next((r["flops_per_sec"] / r["images_per_sec"] for r in reversed(trained)
                            if r.get("flops_per_sec") and r.get("images_per_sec")), None)
    validations = [r for r in rows if "val_bpd" in r]
    last = validations[-1] if validations else {}
    best = min(last.get("val_bpd", math.inf), last.get("val_bpd_ema", math.inf))
    return {"recipe": recipe.name, "settings": recipe.settings, "steps": record["total_steps"],
            "images_seen": record["total_steps"] * step_images,
            "flops": flops_per_image * record["total_steps"] * step_images if flops_per_image else None,
            "val_bpd": last.get("val_bpd"), "val_bpd_se": last.get("val_bpd_se"),
            "val_bpd_ema": last.get("val_bpd_ema"), "val_bpd_ema_se": last.get("val_bpd_ema_se"), "best": best,
            "train_seconds": training_seconds(trained, step_images),
            "curve": [(r["step"] * step_images, r.get("val_bpd_ema", r["val_bpd"])) for r in validations]}


def training_seconds(rows: list[dict], step_images: int) -> float | None:
    """Training time from the logged throughput: each logging window's images over its images/s
    (the first window, which holds the compile, has none)."""
    seconds, previous = 0.0, 0
    for row in rows:
        if row.get("images_per_sec"):
            seconds += (row["step"] - previous) * step_images / row["images_per_sec"]
        previous = row["step"]
    return seconds or None


def write_results(results: list[dict], output_dir: Path, description: str) -> str:
    ranked = sorted(results, key=lambda r: r["best"])
    lines = [description, "",
             "| rank | recipe | held-out bits/dim, EMA | training weights | images seen | FLOPs | training time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rank, r in enumerate(ranked, 1):
        ema = f"{r['val_bpd_ema']:.3f} ± {r['val_bpd_ema_se']:.3f}" if r["val_bpd_ema"] is not None else "-"
        raw = f"{r['val_bpd']:.3f} ± {r['val_bpd_se']:.3f}" if r["val_bpd"] is not None else "-"
        flops = f"{r['flops'] / 1e12:.2f} T" if r["flops"] else "-"
        time = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] else "-"
        lines.append(f"| {rank} | `{r['recipe']}` | {ema} | {raw} | {r['images_seen']:,} | {flops} | {time} |")
    table = "\n".join(lines)
    (output_dir / "results.md").write_text(table + "\n")
    (output_dir / RESULTS).write_text(json.dumps(ranked, indent=2) + "\n")
    plot(ranked, output_dir / "bpd_vs_images.png")
    return table


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # against images seen, and (when the runs logged their FLOPs) against training FLOPs: recipes of
    # different model sizes compare at equal compute only on the second
    by_flops = all(r["flops"] and r["images_seen"] for r in results)
    fig, axes = plt.subplots(1, 2 if by_flops else 1, figsize=(12 if by_flops else 7, 4.2), dpi=110, squeeze=False)
    for r in results:
        if r["curve"]:
            images, bpd = zip(*r["curve"])
            axes[0, 0].plot(images, bpd, "o-", lw=1, ms=3, label=r["recipe"])
            if by_flops:
                per_image = r["flops"] / r["images_seen"]
                axes[0, 1].plot([x * per_image / 1e12 for x in images], bpd, "o-", lw=1, ms=3, label=r["recipe"])
    axes[0, 0].set_xlabel("training images seen")
    if by_flops:
        axes[0, 1].set_xlabel("training TFLOPs")
    for ax in axes[0]:
        ax.set_ylabel("held-out bits/dim (EMA where kept)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    base = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m flaxdiff.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the sweep's folder: a run folder per recipe, results")
    parser.add_argument("--grid", action="append", default=[], help="flag=value1,value2: values to try for a "
                        "train.py flag (repeat for more flags; every combination is a recipe)")
    parser.add_argument("--images_seen", type=int, required=True, help="training images each recipe sees: "
                        "its steps are this over its batch (equal compute across batch sizes)")
    parser.add_argument("--validation_points", type=int, default=8, help="held-out scores along each run "
                        "(default: 8)")
    args = parser.parse_args(own)
    from .cli import report_errors

    return report_errors(lambda: sweep(args, base))


def sweep(args, base: list[str]) -> int:
    from .runtime import enable_compilation_cache

    if args.images_seen < 1:
        raise ValueError("--images_seen must be at least 1")
    output_dir = Path(args.output_dir)
    grid = parse_grid(args.grid)
    planned = recipes(grid, base, output_dir, args.images_seen, args.validation_points)
    output_dir.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache()
    print(f"{len(planned)} recipe(s), {args.images_seen:,} images each -> {output_dir}")
    for recipe in planned:
        if finished(recipe):
            print(f"== recipe {recipe.name}: done before, kept")
            continue
        run_recipe(recipe)
    results = [summarize(recipe) for recipe in planned]
    description = (f"{len(planned)} recipes, {args.images_seen:,} training images each; held-out bits/dim at the "
                   f"end (mean ± standard error over images); flags for all: {' '.join(base) or 'none'}")
    print(write_results(results, output_dir, description))
    return 0


if __name__ == "__main__":
    sys.exit(main())
