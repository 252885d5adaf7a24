"""The sweeps behind docs/recipes.md: `python -m flaxdiff.recipes` on two real datasets of
../shared/data, at two model sizes, as a course student would run them.

* MNIST (the 10,000 test digits, 28 px resized to 32, 1 channel): size x learning rate;
* OpenMoji (4,495 emoji at 32 px, colour): size x prediction type.

Sizes: `tiny` (train.py's --model_preset tiny, 1.1 M parameters) and `wide` (the same blocks with
twice the channels, (32, 64, 128, 128): 4.5 M parameters). 10% of each dataset is held out;
every recipe sees the same number of images (--images_seen), batch 32, EMA kept, a warmup of a
tenth of the run (flaxdiff.recipes' choice for runs shorter than 5,000 steps).

    python benchmarks/recipe_findings.py                          # ~30 minutes on 2 CPU cores
    python benchmarks/recipe_findings.py --datasets mnist --images_seen 3200

Each sweep's folder is --work_dir/<dataset> (resumable); its results.md, results.json and
bpd_vs_images.png are copied to benchmarks/results/recipes/<dataset>/.
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
