"""Resuming: finding the checkpoint --resume_from_checkpoint names, checking it belongs to this
run, restoring the train state; and reading a checkpoint's weights for sampling.

A checkpoint is `output_dir/checkpoints/<step>/` (flaxdiff.checkpoint): the TrainState and the
RunRecord. Orbax commits it atomically, so `latest` never picks a half-written one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..checkpoint import Checkpoints, abstract_like
from ..unet import UNet2DConfig
from .options import OptionsError, TrainOptions
from .run_folder import CHECKPOINTS, RunRecord

# options whose change makes a resumed run leave the original trajectory (a warning, not an error)
TRAJECTORY_OPTIONS = ("train_batch_size", "gradient_accumulation_steps", "seed", "prediction_type",
                      "ddpm_num_steps", "ddpm_beta_schedule")


def find_checkpoint(resume: str, output_dir: Path) -> tuple[Path, int] | None:
    """--resume_from_checkpoint latest | PATH -> (checkpoint directory, step); None when `latest`
    finds nothing. PATH is `.../checkpoints/<step>` or a run's output_dir / checkpoints dir."""
    if resume == "latest":
        directory = output_dir / CHECKPOINTS
        if not directory.is_dir():
            return None
        step = Checkpoints(directory, read_only=True).latest_step()
        return None if step is None else (directory, step)
    path = Path(resume).expanduser()
    if path.is_dir() and path.name.isdigit():
        directory, step = path.parent, int(path.name)
        if step not in Checkpoints(directory, read_only=True).steps():
            raise ValueError(f"{path} is not a complete checkpoint (an interrupted save?); use another step or "
                             "--resume_from_checkpoint latest")
        return directory, step
    for directory in (path / CHECKPOINTS, path):
        if directory.is_dir():
            step = Checkpoints(directory, read_only=True).latest_step()
            if step is not None:
                return directory, step
    raise ValueError(f"--resume_from_checkpoint {resume}: no checkpoint found there; give a checkpoint directory "
                     "(output_dir/checkpoints/<step>), a run's output_dir, or 'latest'")


def read_meta(point: tuple[Path, int]) -> dict:
    """A checkpoint's meta: its RunRecord's JSON, and what the feed keeps (the stream's position)."""
    directory, step = point
    return Checkpoints(directory, read_only=True).read_meta(step)


def read_record(directory: Path, step: int) -> RunRecord:
    return RunRecord.from_json(read_meta((directory, step)))


def check_resumable(point: tuple[Path, int], opts: TrainOptions, unet_config: UNet2DConfig, say) -> None:
    """A checkpoint of another model config is an error; changed trajectory options are warned about."""
    directory, step = point
    record = read_record(directory, step)
    theirs, ours = record.unet, unet_config.to_dict()
    if UNet2DConfig.from_dict(theirs).class_conditional != unet_config.class_conditional:
        kind = "class-conditional" if record.class_names else "unconditional"
        raise OptionsError(f"the checkpoint {directory / str(step)} is of a {kind} run and this run is not: resume "
                           + ("with --class_conditional" if record.class_names else "without --class_conditional")
                           + ", or use another --output_dir")
    diff = sorted(k for k in set(theirs) | set(ours) if not k.startswith("_") and theirs.get(k) != ours.get(k))
    if diff:
        raise OptionsError(f"the checkpoint {directory / str(step)} is of another model config "
                           f"(differs in {', '.join(diff)}); resume with the flags it was trained with, "
                           "or use another --output_dir")
    for key in TRAJECTORY_OPTIONS:
        if getattr(record.options, key) != getattr(opts, key):
            say(f"warning: --{key} was {getattr(record.options, key)} in the checkpoint and is "
                f"{getattr(opts, key)} now: the resumed run will not follow the original trajectory")


def restore_state(point: tuple[Path, int], like: Any) -> Any:
    """The checkpoint's TrainState, laid out (shapes, dtypes, shardings) like `like`."""
    directory, step = point
    return Checkpoints(directory, read_only=True).restore(step, abstract_like(like))


def weights_from_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[RunRecord, Any]:
    """A checkpoint's record and weights: the EMA weights when it has them (use_ema), else the
    training weights. `path`: output_dir/checkpoints/<step>, or a run's output_dir (its latest)."""
    directory, step = find_checkpoint(str(path), Path(path))
    record = read_record(directory, step)
    state = Checkpoints(directory, read_only=True).restore(step, None)  # nested dicts named like TrainState
    ema = state.get("ema_params")
    params = ema if use_ema and ema is not None else state["params"]
    return record, jax.tree.map(np.asarray, params)
