"""Held-out negative log-likelihood in bits/dim of a trained model, from the DDPM variational bound.

    python -m flaxdiff.evaluate --model flaxdiff-shapes-32 --dataset shapes --num_images 256

The bound and its estimators are in `flaxdiff.bound`; this is its command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

if __name__ == "__main__":  # before JAX is imported: see flaxdiff/host.py
    from flaxdiff.host import restart_with_malloc_tuning
    restart_with_malloc_tuning()


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxdiff.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder, train.py output_dir, checkpoint or Hub id")
    parser.add_argument("--dataset", default="shapes", help="held-out images: 'shapes', a Hub id, an image "
                        "folder, or a .npz with an 'images' uint8 NHWC array")
    parser.add_argument("--dataset_config_name", default=None, help="the Hub dataset's config")
    parser.add_argument("--split", default="test", help="the dataset split (default: test; the built-in shapes "
                        "have a held-out test split too)")
    parser.add_argument("--image_column", default=None, help="the column with the images")
    parser.add_argument("--class_column", default=None, help="class-conditional models: the column with the "
                        "images' class labels (default: the first ClassLabel column); the bound is of p(image | label)")
    parser.add_argument("--num_images", type=int, default=256, help="how many images to evaluate (default: 256)")
    parser.add_argument("--num_timesteps", type=int, default=50, help="timesteps per image for the Monte-Carlo "
                        "estimate (default: 50)")
    parser.add_argument("--exact", action="store_true", help="sum over every timestep instead (T model calls "
                        "per image)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="the noise draws (default: 0)")
    parser.add_argument("--no_clip", action="store_true", help="do not clip the model's x_0 prediction")
    parser.add_argument("--no_ema", action="store_true", help="for checkpoints: the training weights, not the EMA")
    parser.add_argument("--output_json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    from flaxdiff.cli import report_errors

    return report_errors(lambda: _run(args))


def _run(args) -> int:
    from flaxdiff.bound import pipeline_bits_per_dim
    from flaxdiff.data import DataSpec, load_image_data
    from flaxdiff.load import load_pipeline
    from flaxdiff.runtime import enable_compilation_cache

    for name in ("num_images", "num_timesteps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    enable_compilation_cache()
    pipe = load_pipeline(args.model, use_ema=not args.no_ema)
    config = pipe.unet.config
    spec = DataSpec(dataset=args.dataset, resolution=config.image_size[0], channels=config.in_channels,
                    center_crop=True, dataset_config_name=args.dataset_config_name, split=args.split,
                    image_column=args.image_column, max_train_samples=args.num_images,
                    num_shapes=args.num_images, labels=pipe.class_labels is not None, class_column=args.class_column)
    data = load_image_data(spec)
    images, labels = (data, None) if pipe.class_labels is None else (data.images, model_labels(pipe, data))
    result = pipeline_bits_per_dim(pipe, images, labels, num_timesteps=None if args.exact else args.num_timesteps,
                                   batch_size=args.batch_size, seed=args.seed,
                                   clip_denoised=False if args.no_clip else None, progress=True)
    print(f"{args.model} on {args.dataset}: {result}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({k: v for k, v in dataclasses.asdict(result).items() if k != "per_image"}, f, indent=2)
    return 0


def model_labels(pipe, data):
    """The data's labels in the model's numbering: by class name where the model names its classes,
    as they are where it only numbers them."""
    import numpy as np

    names = pipe.class_labels.names
    if tuple(data.names) == tuple(names) or all(name.isdigit() for name in names):
        return data.labels
    unknown = sorted(set(data.names) - set(names))
    if unknown:
        raise ValueError(f"the dataset's classes {', '.join(unknown)} are not among the model's ({', '.join(names)})")
    return np.asarray([names.index(data.names[label]) for label in data.labels], np.int32)


if __name__ == "__main__":
    sys.exit(main())
