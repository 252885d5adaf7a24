"""Where a run's metrics and sample grids go besides metrics.jsonl and the PNGs: TensorBoard or
Weights & Biases (`--logger`, diffusers' flag and meanings).

The loop hands a logger the rows it already fetched at --logging_steps (the loop's only host
sync) and the grids it already wrote, so logging never makes the train step wait. Only process 0
logs. Each backend is an optional extra; a missing one is an `error:` before training that names
the pip command.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from .options import OptionsError, TrainOptions

# --logger -> (the Python package it needs, the pip command that installs it)
BACKENDS = {"tensorboard": ("tensorboardX", 'pip install "flaxdiff[tensorboard]" (tensorboardX)'),
            "wandb": ("wandb", 'pip install "flaxdiff[wandb]" (wandb)')}


def check_logger(kind: str) -> None:
    """Fail before training when the backend's package is missing."""
    if kind in BACKENDS and importlib.util.find_spec(BACKENDS[kind][0]) is None:
        raise OptionsError(f"--logger {kind} needs the {BACKENDS[kind][0]} package: {BACKENDS[kind][1]}, or "
                           "--logger none (metrics.jsonl and the sample PNGs are written either way)")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row worth a curve (not the step itself)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}


class Logger:
    """--logger none: everything is in metrics.jsonl and samples/ already."""

    def log(self, step: int, row: dict) -> None:
        pass

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(Logger):
    """Event files under output_dir/--logging_dir (tensorboardX writes them on its own thread)."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder))

    def log(self, step: int, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, step: int, name: str, path: Path) -> None:
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run named after the output folder, with every option as its config (WANDB_MODE=offline
    keeps it on disk under output_dir/--logging_dir)."""

    def __init__(self, folder: Path, opts: TrainOptions, name: str):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=opts.tracker_project_name, name=name, dir=str(folder),
                              config=dataclasses.asdict(opts))

    def log(self, step: int, row: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars(row).items()}, step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(opts: TrainOptions, out: Path, is_main: bool) -> Logger:
    if not is_main or opts.logger == "none":
        return Logger()
    folder = out / opts.logging_dir
    if opts.logger == "tensorboard":
        return TensorBoardLogger(folder)
    return WandbLogger(folder, opts, out.name)
