#!/usr/bin/env python
"""Generate images with a trained model: a train.py output_dir, a checkpoint, or any diffusers
DDPMPipeline folder (local or on the Hub).

    python sample.py --model flaxdiff-shapes-32                       # grid of 16 -> samples.png
    python sample.py --model flaxdiff-shapes-32 --sampler dpmsolver++ --num_inference_steps 20 \\
        --num_images 64 --output grid.png --output_dir images/ --save_npz images.npz
    python sample.py --model google/ddpm-cifar10-32 --sampler ddim    # a Hub pipeline
    python sample.py --model flaxdiff-shapes-32-cond --class_labels circle,cross --guidance_scale 3

Each batch is one compiled program (the whole reverse process in one lax.scan), spread over all
devices; the same --seed gives the same images on the same machine.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before JAX is imported: see flaxdiff/host.py
    from flaxdiff.host import restart_with_malloc_tuning
    restart_with_malloc_tuning()

import argparse
import math
from pathlib import Path

from flaxdiff.choices import SAMPLER_NAMES
from flaxdiff.cli import report_errors
from flaxdiff.host import one_cpu_device_per_core
from flaxdiff.hub import local_unet_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a train.py output_dir, a checkpoint "
                        "(output_dir/checkpoints/<step>), a diffusers pipeline folder, or a Hub id")
    parser.add_argument("--num_images", type=int, default=16, help="how many images (default: 16)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per compiled batch, split over all "
                        "devices (default: 16)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help="default: the model's own scheduler (DDPM for train.py models)")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="default: 1000 for ddpm, 50 for the others")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 deterministic, 1 DDPM-like)")
    parser.add_argument("--seed", type=int, default=0, help="the images are a function of the seed (default: 0)")
    parser.add_argument("--output", default=None, help="a PNG grid of all images (default: samples.png when no "
                        "other output is asked for)")
    parser.add_argument("--output_dir", default=None, help="a folder for one PNG per image")
    parser.add_argument("--save_npz", default=None, help="a .npz with the images as uint8 NHWC ('images')")
    parser.add_argument("--no_ema", action="store_true", help="for checkpoints: the training weights, not the EMA")
    parser.add_argument("--class_labels", default=None, help="class-conditional models: the classes to sample, as "
                        "numbers or names, comma-separated (1,5 or circle,cross), repeated over the images "
                        "(default: every class in turn)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance for "
                        "class-conditional models trained with a null class (1: none; 3 is a good start; "
                        "default: none)")
    return parser


def check_args(args) -> None:
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta}")
    for target in (args.output, args.save_npz):
        if target is not None:
            parent = Path(target).expanduser().absolute().parent
            if not parent.is_dir():
                raise ValueError(f"cannot write {target}: the folder {parent} does not exist")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file: choose a folder")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_args(args)
        # before JAX starts (flaxdiff/host.py); large UNets keep one device
        one_cpu_device_per_core(args.batch_size, unet_config=local_unet_config(args.model))
        return run(args)

    return report_errors(body)


def run(args) -> int:
    import jax
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from flaxdiff.images import image_grid, to_uint8
    from flaxdiff.load import load_pipeline
    from flaxdiff.runtime import enable_compilation_cache

    enable_compilation_cache()
    pipe = load_pipeline(args.model, use_ema=not args.no_ema)
    devices = jax.local_device_count()
    batch = args.batch_size
    if batch % devices:
        raise ValueError(f"--batch_size {batch} must be divisible by the {devices} devices, so every device "
                         f"gets the same share; use a multiple of {devices}")
    plan = pipe.plan(args.sampler, args.num_inference_steps, args.eta)
    labels = image_labels(pipe, args.class_labels, math.ceil(args.num_images / batch) * batch)
    pipe.condition(None if labels is None else labels[:batch], args.guidance_scale, batch)  # bad input fails now
    print(f"{args.num_images} images from {args.model} with {plan.kind}, {plan.num_steps} steps, "
          f"batches of {batch} over {devices} device(s)"
          + ("" if labels is None else f"; classes {', '.join(pipe.class_labels.names[i] for i in sorted(set(labels)))}"
             + (f", guidance {args.guidance_scale}" if args.guidance_scale is not None else "")))
    key = jax.random.key(args.seed)
    chunks = []
    for index in tqdm(range(math.ceil(args.num_images / batch)), desc="sampling", unit="batch"):
        chunks.append(pipe(batch_size=batch, num_inference_steps=plan.num_steps, sampler=args.sampler,
                           eta=args.eta, key=jax.random.fold_in(key, index),
                           class_labels=None if labels is None else labels[index * batch:(index + 1) * batch],
                           guidance_scale=args.guidance_scale))
    images = to_uint8(np.concatenate(chunks)[:args.num_images])
    written = []
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:05d}.png")
        written.append(f"{len(images)} PNGs in {folder}")
    if args.save_npz:
        np.savez_compressed(args.save_npz, images=images)
        written.append(args.save_npz)
    if args.output or not written:
        grid_path = args.output or "samples.png"
        image_grid(images).save(grid_path)
        written.append(grid_path)
    print("wrote " + ", ".join(written))
    return 0


def image_labels(pipe, requested: str | None, count: int):
    """The class label of each image: --class_labels repeated, or every class in turn; None for an
    unconditional model (which takes no labels)."""
    if pipe.class_labels is None:
        if requested is not None:
            raise ValueError("--class_labels: this model is unconditional")
        return None
    if requested is None:
        if not pipe.class_labels.names:
            raise ValueError("this class-conditional model does not name its classes: give --class_labels")
        classes = list(range(len(pipe.class_labels.names)))
    else:
        classes = [pipe.class_labels.label_of(value.strip()) for value in requested.split(",") if value.strip()]
    return [classes[i % len(classes)] for i in range(count)]


if __name__ == "__main__":
    sys.exit(main())
