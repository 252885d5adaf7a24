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

from flaxdiff.cli import report_errors
from flaxdiff.training import TrainOptions, train
from flaxdiff.training.options import build_parser


def main(argv=None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    return report_errors(lambda: train(TrainOptions(**vars(args))) and 0,
                         interrupted="interrupted: resume with --resume_from_checkpoint latest")


if __name__ == "__main__":
    sys.exit(main())
