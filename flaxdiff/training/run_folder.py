"""The run folder: what a training run writes, checked before anything is written, never
deleting a user's files.

    output_dir/
      model_index.json unet/ scheduler/   the diffusers DDPMPipeline (EMA weights when --use_ema)
      README.md                           the model card (model_card.py)
      samples.png samples/epoch_*.png     sample grids
      loss_curve.png metrics.jsonl        the training log (metrics.py)
      train_config.json                   the RunRecord
      checkpoints/<step>/                 Orbax checkpoints (state + the RunRecord)
      logs/                               --logger's files (loggers.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..hub import RUN_RECORD_FILE as RECORD_FILE
from ..parallel import barrier
from .options import OptionsError, TrainOptions

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
MODEL_CARD = "README.md"
# everything a run writes; --overwrite_output_dir removes these and nothing else
RUN_OUTPUTS = (CHECKPOINTS, SAMPLES, METRICS_FILE, RECORD_FILE, MODEL_CARD, "samples.png", "loss_curve.png",
               "model_index.json", "unet", "scheduler")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a run is: written to train_config.json and into every checkpoint's meta, read back by
    resume checks, the model card and `load_pipeline`."""

    unet: dict[str, Any]  # the diffusers UNet2DModel config
    scheduler: dict[str, Any]  # the diffusers scheduler config
    options: TrainOptions  # every option, resolved
    num_images: int
    steps_per_epoch: int
    total_steps: int
    class_names: tuple[str, ...] | None = None  # a class-conditional run's classes (label i is class_names[i])
    null_label: int | None = None  # the label of "no class" (class dropout), for classifier-free guidance

    def to_json(self) -> dict:
        data = {"unet": self.unet, "scheduler": self.scheduler, "options": dataclasses.asdict(self.options),
                "num_images": self.num_images, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}
        if self.class_names is not None:
            data.update(class_names=list(self.class_names), null_label=self.null_label)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "RunRecord":
        """Options this version does not know (a run of another flaxdiff version) are dropped."""
        known = {field.name for field in dataclasses.fields(TrainOptions)}
        options = TrainOptions(**{k: v for k, v in data.get("options", {}).items() if k in known})
        names = data.get("class_names")
        return cls(unet=data["unet"], scheduler=data["scheduler"], options=options,
                   num_images=data.get("num_images", 0), steps_per_epoch=data.get("steps_per_epoch", 0),
                   total_steps=data.get("total_steps", 0), class_names=None if names is None else tuple(names),
                   null_label=data.get("null_label"))

    def write(self, folder: Path) -> None:
        (folder / RECORD_FILE).write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")


def prepare_output_dir(opts: TrainOptions, is_main: bool) -> Path:
    """Check (and create) output_dir before any expensive work; never remove a user's files.

    --overwrite_output_dir on a previous run removes what that run wrote (RUN_OUTPUTS and the
    --logging_dir folder) and keeps any other file in the folder.
    """
    out = Path(opts.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OptionsError(f"--output_dir {out} is a file: choose a folder")
    holds_run = (out / RECORD_FILE).exists() or (out / CHECKPOINTS).exists()
    if out.is_dir() and any(out.iterdir()) and not opts.resume_from_checkpoint:
        if not holds_run:
            raise OptionsError(f"--output_dir {out} already holds files that are not a flaxdiff run; choose an "
                               "empty or new folder")
        if not opts.overwrite_output_dir:
            raise OptionsError(f"--output_dir {out} holds a previous run: pass --resume_from_checkpoint latest to "
                               "continue it, --overwrite_output_dir to start over (deletes its checkpoints, samples "
                               "and pipeline), or another --output_dir")
    barrier("output_dir checked")  # every process has looked before any process writes
    try:  # every process: multi-host checkpoints are written by all of them
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OptionsError(f"--output_dir {out} is not writable ({error.strerror}): choose another folder") \
            from error
    if is_main and opts.overwrite_output_dir and holds_run:
        for name in (*RUN_OUTPUTS, opts.logging_dir):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return out


def copy_last_grid(out: Path) -> None:
    """samples.png: the last epoch's grid, the picture the model card shows."""
    grids = sorted((out / SAMPLES).glob("epoch_*.png"))
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
