"""Does class conditioning work? Train on the built-in shapes with their kinds as labels (`train.py
--class_conditional` with its defaults), sample each kind, and let a classifier trained on real
shapes say which kind each sample shows: per-kind accuracy at guidance 0 (the null class, no
class information), 1 (plain conditional) and 3.

    python benchmarks/class_conditional_shapes.py          # ~14 minutes on 2 CPU cores
    python benchmarks/class_conditional_shapes.py --evaluate_only   # score the trained model again
    python benchmarks/class_conditional_shapes.py --name batch8_epochs10 -- --train_batch_size 8 --num_epochs 10
                                          # another budget or recipe: any train.py flags after --

Results: a markdown table on stdout, benchmarks/results/class_conditional_shapes.json (one entry
per --name), and for the default run the per-class grid docs/class_conditional_shapes.png (one row
per kind, guidance 3; other runs keep theirs in their work folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GUIDANCE = (0.0, 1.0, 3.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(HERE / "results" / "class_conditional_shapes"))
    parser.add_argument("--samples_per_class", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=100, help="DDPM steps (train.py's grids)")
    parser.add_argument("--evaluate_only", action="store_true")
    parser.add_argument("--name", default="default", help="the run's name in the results file and work folder "
                        "(default: 'default', train.py --class_conditional's defaults)")
    parser.add_argument("train_flags", nargs="*", help="after --: train.py flags for this run")
    args = parser.parse_args()
    from flaxdiff import DiffusionPipeline
    from flaxdiff.data import SHAPE_KINDS
    from flaxdiff.images import image_grid, to_uint8
    from flaxdiff.training import TrainOptions, train
    from flaxdiff.training.options import build_parser
    from shape_classifier import train_shape_classifier

    work = Path(args.work_dir) / args.name
    run = work / "model"
    flags = ["--class_conditional", "--output_dir", str(run), "--overwrite_output_dir", *args.train_flags]
    if not args.evaluate_only:
        start = time.perf_counter()
        train(TrainOptions(**vars(build_parser().parse_args(flags))))
        train_seconds = time.perf_counter() - start
    judge = train_shape_classifier()
    pipe = DiffusionPipeline.from_pretrained(run)
    results_file = HERE / "results" / "class_conditional_shapes.json"
    everything = json.loads(results_file.read_text()) if results_file.exists() else {}
    everything = everything if "runs" in everything else {"runs": {}}
    results = {"train_flags": args.train_flags, "classifier_test_accuracy": judge.test_accuracy,
               "samples_per_class": args.samples_per_class, "sampler": f"ddpm {args.num_inference_steps} steps",
               "accuracy": {}}
    if not args.evaluate_only:
        results["train_seconds"] = train_seconds
    elif "train_seconds" in everything["runs"].get(args.name, {}):
        results["train_seconds"] = everything["runs"][args.name]["train_seconds"]
    grid_rows = []
    for guidance in GUIDANCE:
        per_kind = {}
        for label, kind in enumerate(SHAPE_KINDS):
            images = to_uint8(pipe(class_labels=[label] * args.samples_per_class, guidance_scale=guidance,
                                   sampler="ddpm", num_inference_steps=args.num_inference_steps, seed=label))
            per_kind[kind] = float((judge.predict(images) == label).mean())
            if guidance == 3.0:
                grid_rows.append(images[:8])
        per_kind["all"] = float(np.mean(list(per_kind.values())))
        results["accuracy"][str(guidance)] = per_kind
        print(f"guidance {guidance}: " + ", ".join(f"{k} {v:.0%}" for k, v in per_kind.items()))
    grid = image_grid(np.concatenate(grid_rows), columns=8)  # one row per kind
    picture = HERE.parent / "docs" / "class_conditional_shapes.png" if args.name == "default" else work / "grid.png"
    grid.resize((grid.width * 2, grid.height * 2), 0).save(picture)
    everything["runs"][args.name] = results
    results_file.write_text(json.dumps(everything, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    kinds = [k for k in results["accuracy"][str(GUIDANCE[0])] if k != "all"]
    flags = " ".join(results["train_flags"]) or "(the default budget)"
    lines = [f"train.py --class_conditional {flags}: share of {results['samples_per_class']} samples per kind that a classifier of real shapes "
             f"(held-out accuracy {results['classifier_test_accuracy']:.1%}) calls the kind asked for; "
             f"{results['sampler']}.", "",
             "| guidance | " + " | ".join(kinds) + " | all |", "| --- |" + " --- |" * (len(kinds) + 1)]
    for guidance, row in results["accuracy"].items():
        lines.append(f"| {guidance} | " + " | ".join(f"{row[k]:.0%}" for k in kinds) + f" | {row['all']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
