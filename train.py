#!/usr/bin/env python
"""Train an unconditional diffusion model (the diffusers UNet2DModel) with JAX on every device.

    python train.py                                     # tiny UNet on the built-in shapes, CPU-friendly
    python train.py --dataset smithsonian_butterflies   # the course's dataset and UNet
    python train.py --dataset ./my_images --resolution 64 --use_ema

The flags are diffusers' train_unconditional.py flags; `--help` lists them all. The output_dir
ends as a diffusers DDPMPipeline folder (load it with flaxdiff or PyTorch diffusers), plus
checkpoints/, samples/, metrics.jsonl and loss_curve.png.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before JAX is imported: see flaxdiff/host.py
    from flaxdiff.host import restart_with_malloc_tuning
    restart_with_malloc_tuning()

import argparse
import dataclasses

from flaxdiff.cli import report_errors
from flaxdiff.trainer import TrainOptions, train

GROUPS = {"data": "data", "model": "model and noise schedule", "optim": "optimisation",
          "output": "outputs, sampling and checkpoints", "scale": "scale (multi-device, multi-host)"}
TYPES = {"str": str, "int": int, "float": float}


def build_parser(options_class=TrainOptions, description: str = __doc__) -> argparse.ArgumentParser:
    """argparse flags from the dataclass fields: names, defaults, help and choices in one place."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for field in dataclasses.fields(options_class):
        meta = field.metadata
        target = groups.get(meta.get("group"), parser)
        flag = f"--{field.name}"
        annotation = str(field.type).replace(" ", "").replace("|None", "")
        if annotation == "bool":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=meta["help"])
            continue
        kind = TYPES[annotation.split("|")[0]]
        default = field.default
        shown = "" if default is None else f" (default: {default})"
        target.add_argument(flag, type=kind, default=default, choices=meta.get("choices"),
                            help=meta["help"] + shown, metavar=None if meta.get("choices") else kind.__name__.upper())
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: train(TrainOptions(**vars(args))) and 0,
                         interrupted="interrupted: resume with --resume_from_checkpoint latest")


if __name__ == "__main__":
    sys.exit(main())
