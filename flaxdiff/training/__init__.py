"""The training job behind train.py, one module per concept:

* `options`: TrainOptions (diffusers' train_unconditional flags), presets, checks; no JAX.
* `model`: the UNet config and noise schedule a run trains, and the model built from them.
* `feed`: which images reach which device each step (order, process slice, device dataset, prefetch).
* `step`: the pure, compiled, data-parallel train step (loss, AdamW, EMA).
* `setup`: everything prepared and checked before the first step.
* `loop`: `train()`, feed -> step -> hooks.
* `run_folder`, `metrics`, `model_card`: what a run writes. `resume`: finding and restoring checkpoints.
"""

from .options import OptionsError, TrainOptions

__all__ = ["OptionsError", "TrainOptions", "train"]


def train(opts: TrainOptions, log=print):
    """Run the training job (`flaxdiff.training.loop.train`); returns the output directory."""
    from .loop import train as run

    return run(opts, log)
