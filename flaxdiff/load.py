"""`load_pipeline`: whatever a user calls a model, as a DiffusionPipeline.

A diffusers pipeline folder, a train.py output_dir (its pipeline, or its latest checkpoint before
the first pipeline is saved), a checkpoint (output_dir/checkpoints/<step>), or a Hub id. Used by
sample.py and `python -m flaxdiff.evaluate`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .hub import is_pipeline_folder
from .pipeline import DiffusionPipeline


def load_pipeline(path: str | os.PathLike, use_ema: bool = True) -> DiffusionPipeline:
    """use_ema: for checkpoints, the EMA weights when the run kept them (else the training weights)."""
    local = Path(path).expanduser()
    if not local.exists():
        return DiffusionPipeline.from_pretrained(path)
    if not local.is_dir():
        raise ValueError(f"{path} is a file; give a folder (a pipeline, a train.py output_dir or a "
                         "checkpoint) or a Hub id")
    if is_pipeline_folder(local):
        return DiffusionPipeline.from_pretrained(local)
    if local.name.isdigit() or (local / "checkpoints").is_dir():
        return pipeline_from_checkpoint(local, use_ema)
    raise ValueError(f"{path} is not a model: expected a diffusers pipeline folder (model_index.json, unet/, "
                     "scheduler/), a train.py output_dir, or a checkpoint (output_dir/checkpoints/<step>)")


def pipeline_from_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> DiffusionPipeline:
    from flax import nnx

    from .training.resume import weights_from_checkpoint
    from .unet import UNet2D, UNet2DConfig

    record, params = weights_from_checkpoint(path, use_ema)
    graphdef = nnx.graphdef(UNet2D(UNet2DConfig.from_dict(record.unet), rngs=nnx.Rngs(0)))
    return DiffusionPipeline(nnx.merge(graphdef, params), record.scheduler)
