"""Which default recipe samples well with every sampler? Candidate recipes for `python train.py`
(the built-in shapes, the same CPU budget: the tiny UNet, 2,560 steps of batch 8), each sampled with
DDPM (100 steps, the grids' sampler), DDIM (50 steps) and DPM-Solver++ (20 steps) and judged by
what a sample should look like: the share of samples a classifier of real shapes recognises as
some shape (at 90% confidence), and the colour statistics of the samples against the data's
(contrast: luminance spread per image; saturation), which see grey or saturated failures.

    python benchmarks/default_recipe.py                   # ~40 minutes on 2 CPU cores
    python benchmarks/default_recipe.py --only v-zsnr-trailing --evaluate_only

Results: benchmarks/results/default_recipe.json, a markdown table on stdout, the grids per recipe
and sampler in benchmarks/results/default_recipe/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CANDIDATES = {
    "epsilon-linear-leading": {},  # the default before this benchmark
    "v-zsnr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "v-cosine-trailing": dict(prediction_type="v_prediction", ddpm_beta_schedule="squaredcos_cap_v2",
                              timestep_spacing="trailing"),
    "epsilon-cosine-trailing": dict(ddpm_beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
}
SAMPLERS = (("ddpm", 100), ("ddim", 50), ("dpmsolver++", 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(HERE / "results" / "default_recipe"))
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--evaluate_only", action="store_true")
    args = parser.parse_args()
    from flaxdiff import DiffusionPipeline
    from flaxdiff.data import DataSpec, load_images
    from flaxdiff.images import image_grid, to_uint8
    from flaxdiff.training import TrainOptions, train
    from shape_classifier import colour_statistics, train_shape_classifier

    work = Path(args.work_dir)
    results_file = HERE / "results" / "default_recipe.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    judge = train_shape_classifier()
    data = load_images(DataSpec(num_shapes=args.samples, split="test"), progress=False)
    results["data"] = {"recognisable": judge.recognisable(data), **colour_statistics(data)}
    names = args.only.split(",") if args.only else list(CANDIDATES)
    for name in names:
        run = work / name
        if not args.evaluate_only:
            train(TrainOptions(output_dir=str(run), overwrite_output_dir=True, **CANDIDATES[name]))
        pipe = DiffusionPipeline.from_pretrained(run)
        results[name] = {"flags": CANDIDATES[name]}
        for sampler, steps in SAMPLERS:
            images = to_uint8(pipe(batch_size=args.samples, sampler=sampler, num_inference_steps=steps, seed=0))
            image_grid(images[:32], columns=8).save(work / f"{name}_{sampler}.png")
            results[name][sampler] = {"recognisable": judge.recognisable(images), **colour_statistics(images)}
            print(name, sampler, results[name][sampler], flush=True)
        if name == "epsilon-linear-leading":  # as the folders before _use_default_values: DPM-Solver spaced "leading"
            before = DiffusionPipeline(pipe.unet, {k: v for k, v in pipe.scheduler_config.items()
                                                   if k != "_use_default_values"})
            images = to_uint8(before(batch_size=args.samples, sampler="dpmsolver++", num_inference_steps=20, seed=0))
            image_grid(images[:32], columns=8).save(work / f"{name}_dpmsolver++_leading.png")
            results[name]["dpmsolver++ leading"] = {"recognisable": judge.recognisable(images),
                                                    **colour_statistics(images)}
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    data = results["data"]
    lines = [f"Share of samples a classifier of real shapes recognises (>= 90% confident); contrast and saturation "
             f"as a share of the real shapes' ({data['contrast']:.3f}, {data['saturation']:.3f}); real shapes: "
             f"{data['recognisable']:.0%} recognised.", "",
             "| recipe | " + " | ".join(f"{s} {n}" for s, n in SAMPLERS) + " |",
             "| --- |" + " --- |" * len(SAMPLERS)]
    for name, row in results.items():
        if name == "data":
            continue
        cells = [f"{row[s]['recognisable']:.0%} (contrast {row[s]['contrast'] / data['contrast']:.2f}, "
                 f"saturation {row[s]['saturation'] / data['saturation']:.2f})" for s, _ in SAMPLERS if s in row]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        if "dpmsolver++ leading" in row:
            old = row["dpmsolver++ leading"]
            lines.append(f"| `{name}`, DPM-Solver++ spaced as before (leading) | | | {old['recognisable']:.0%} "
                         f"(contrast {old['contrast'] / data['contrast']:.2f}, saturation "
                         f"{old['saturation'] / data['saturation']:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
