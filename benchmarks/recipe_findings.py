"""The sweeps behind docs/recipes.md: `python -m flaxdiff.recipes` on two real datasets of
../shared/data, at two model sizes, as a course student would run them.

* MNIST (the 10,000 test digits, 28 px resized to 32, 1 channel): size x learning rate;
* OpenMoji (4,495 emoji at 32 px, colour): size x prediction type.

Sizes: `tiny` (train.py's --model_preset tiny, 1.1 M parameters) and `wide` (the same blocks with
twice the channels, (32, 64, 128, 128): 4.5 M parameters). 10% of each dataset is held out;
every recipe sees the same number of images (--images_seen), batch 32, EMA kept, a warmup of a
tenth of the run (flaxdiff.recipes' choice for runs shorter than 5,000 steps).

    python benchmarks/recipe_findings.py                          # ~75 minutes on 2 CPU cores
    python benchmarks/recipe_findings.py --datasets mnist --images_seen 3200

Each sweep's folder is --work_dir/<dataset> (resumable); its results.md, results.json and
bpd_vs_images.png are copied to benchmarks/results/recipes/<dataset>/, beside paired.md and
paired.json: each recipe's final EMA scored again image by image, and its gap to the best recipe
with the standard error of the paired differences (what separates two recipes; the +- of
results.md is the standard error over images, most of which every recipe shares).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

SWEEPS = {
    "mnist": dict(file="mnist_t10k.npz", channels=1, grid=["learning_rate=1e-3,3e-4"]),
    # lr 1e-3: MNIST's better rate for both sizes (diffusers' 1e-4 default is tuned for far longer runs)
    "openmoji": dict(file="openmoji_32.npz", channels=3, grid=["prediction_type=epsilon,v_prediction",
                                                               "learning_rate=1e-3"]),
}


def size_configs(folder: Path, channels: int) -> dict[str, Path]:
    """config.json files for the two sizes, with the dataset's channels."""
    from flaxdiff.training.options import PRESETS

    sizes = {"tiny": PRESETS["tiny"], "wide": dict(PRESETS["tiny"], block_out_channels=(32, 64, 128, 128))}
    paths = {}
    for name, blocks in sizes.items():
        path = folder / "configs" / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        config = dict(_class_name="UNet2DModel", sample_size=32, in_channels=channels, out_channels=channels,
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in blocks.items()})
        path.write_text(json.dumps(config, indent=2))
        paths[name] = path.parent
    return paths


def paired_gaps(runs: Path, channels: int) -> dict:
    """Each finished recipe's final EMA pipeline scored again on its held-out images with the
    validation's draws, image by image, and its gap to the best recipe with the standard error of
    the paired differences. Every recipe is scored on the same images with the same timesteps and
    noise, so most of the image-to-image spread (the +- of results.md) cancels in a difference."""
    import numpy as np
    from flaxdiff.bound import pipeline_bits_per_dim
    from flaxdiff.data import load_image_data
    from flaxdiff.hub import RUN_RECORD_FILE
    from flaxdiff.load import load_pipeline
    from flaxdiff.training.run_folder import RunRecord
    from flaxdiff.training.setup import data_spec
    from flaxdiff.training.validation import BATCH, SEED, split_off_validation

    per_image = {}
    for folder in sorted(p.parent for p in runs.glob("*/model_index.json")):  # finished recipes
        opts = RunRecord.from_json(json.loads((folder / RUN_RECORD_FILE).read_text())).options
        spec = data_spec(opts, channels)
        validation = split_off_validation(opts, spec, load_image_data(spec), False)[1]
        result = pipeline_bits_per_dim(load_pipeline(folder), validation.images, batch_size=BATCH, seed=SEED,
                                       num_timesteps=opts.validation_num_timesteps)
        per_image[folder.name] = result.per_image
        print(f"{folder.name}: {result}", flush=True)
    best = min(per_image, key=lambda name: per_image[name].mean())
    rows = {}
    for name, values in per_image.items():
        gap = values - per_image[best]
        rows[name] = {"bits_per_dim": float(values.mean()), "gap_to_best": float(gap.mean()),
                      "gap_standard_error": float(gap.std(ddof=1) / np.sqrt(len(gap))) if name != best else 0.0}
    return {"best": best, "images": len(per_image[best]), "recipes": rows}


def paired_table(paired: dict) -> str:
    lines = [f"Final EMA weights, {paired['images']} held-out images, the same timesteps and noise for every recipe; "
             "the gap to the best recipe with the standard error of the paired per-image differences.", "",
             "| recipe | held-out bits/dim, EMA | gap to the best (paired s.e.) |", "| --- | ---: | ---: |"]
    for name, row in sorted(paired["recipes"].items(), key=lambda item: item[1]["bits_per_dim"]):
        gap = "best" if name == paired["best"] else f"+{row['gap_to_best']:.3f} ± {row['gap_standard_error']:.3f}"
        lines.append(f"| `{name}` | {row['bits_per_dim']:.3f} | {gap} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(SWEEPS), help="which sweeps (default: mnist,openmoji)")
    parser.add_argument("--work_dir", default=str(HERE / "results" / "recipe_runs"),
                        help="where the runs go (default: benchmarks/results/recipe_runs, ignored by git; kept "
                        "across restarts, so an interrupted sweep resumes)")
    parser.add_argument("--images_seen", type=int, default=12_800, help="images each recipe sees (default: 12,800)")
    args = parser.parse_args()
    from flaxdiff import recipes

    for name in args.datasets.split(","):
        sweep = SWEEPS[name]
        folder = Path(args.work_dir) / name
        configs = size_configs(folder, sweep["channels"])
        grid = [f"model_config_name_or_path={configs['tiny']},{configs['wide']}", *sweep["grid"]]
        argv = ["--output_dir", str(folder / "runs"), "--images_seen", str(args.images_seen), "--validation_points",
                "6", *[x for g in grid for x in ("--grid", g)], "--",
                "--dataset", str(DATA / sweep["file"]), "--resolution", "32", "--validation_split", "0.1",
                "--train_batch_size", "32", "--use_ema", "--validation_num_images", "256"]
        if recipes.main(argv):
            return 1
        results = HERE / "results" / "recipes" / name
        results.mkdir(parents=True, exist_ok=True)
        for file in ("results.md", "results.json", "bpd_vs_images.png"):
            shutil.copy(folder / "runs" / file, results / file)
        paired = paired_gaps(folder / "runs", sweep["channels"])
        (results / "paired.json").write_text(json.dumps(paired, indent=1) + "\n")
        (results / "paired.md").write_text(paired_table(paired) + "\n")
        print(paired_table(paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
