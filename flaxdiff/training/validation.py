"""Validation during training: the held-out bits/dim (flaxdiff.bound) of the EMA and the training
weights, every --validation_steps.

The held-out images, the timesteps and the noise are fixed for the whole run (a function of
`SEED`, the image positions and `BATCH`), so successive values compare, and a value equals what
`python -m flaxdiff.evaluate` prints for the same weights with the same draws (the `evaluate`
command of `Validation.command`). The program is compiled once: the weights are its argument.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..bound import bits_per_dim, unet_model_fn
from ..data import DataSpec, LabeledImages, load_image_data
from .options import TrainOptions, validation_fraction

SEED, BATCH = 0, 64  # python -m flaxdiff.evaluate's defaults


@dataclasses.dataclass
class Validation:
    images: np.ndarray  # uint8, the held-out images
    labels: np.ndarray | None  # their class labels, for a class-conditional model
    source: str  # where they come from, for the log

    def score(self, graphdef, params, scheduler_config: dict, num_timesteps: int) -> tuple[float, float]:
        """(bits/dim, standard error over images) of the weights `params`."""
        result = bits_per_dim(unet_model_fn(graphdef), self.images, scheduler_config, num_timesteps=num_timesteps,
                              batch_size=BATCH, seed=SEED, params=params, labels=self.labels)
        return result.bits_per_dim, result.standard_error

    def run(self, graphdef, state, scheduler_config: dict, num_timesteps: int) -> dict:
        """A metrics.jsonl row's validation entries: the training weights' and, kept, the EMA's."""
        start = time.perf_counter()
        row = {}
        row["val_bpd"], row["val_bpd_se"] = self.score(graphdef, state.params, scheduler_config, num_timesteps)
        if state.ema_params is not None:
            row["val_bpd_ema"], row["val_bpd_ema_se"] = self.score(graphdef, state.ema_params, scheduler_config,
                                                                   num_timesteps)
        row["val_seconds"] = time.perf_counter() - start
        return row


def split_off_validation(opts: TrainOptions, spec: DataSpec, data, progress: bool):
    """(the training data, the Validation) for --validation_split: a named split loaded apart, or a
    seeded fraction of the training images taken out of training. (data, None) without it."""
    if opts.validation_split is None:
        return data, None
    fraction = validation_fraction(opts.validation_split)
    if fraction is None:
        # as python -m flaxdiff.evaluate loads them: the first N, centre-cropped, not depending on --seed
        count = opts.validation_num_images
        held = load_image_data(dataclasses.replace(spec, split=opts.validation_split, center_crop=True, seed=0,
                                                   max_train_samples=count, num_shapes=count), progress)
        held_images, held_labels = (held.images, held.labels) if isinstance(held, LabeledImages) else (held, None)
        if isinstance(data, LabeledImages) and tuple(held.names) != tuple(data.names):
            raise ValueError(f"the {opts.validation_split} split's classes {held.names} differ from the training "
                             f"split's {data.names}")
        return data, Validation(held_images, held_labels, f"split {opts.validation_split!r}")
    images, labels = (data.images, data.labels) if isinstance(data, LabeledImages) else (data, None)
    order = np.random.default_rng([opts.seed, 11]).permutation(len(images))
    count = min(max(1, int(round(fraction * len(images)))), len(images) - 1)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    validation = Validation(images[held][:opts.validation_num_images],
                            None if labels is None else labels[held][:opts.validation_num_images],
                            f"{count} training images held out ({fraction:g})")
    train = images[kept] if labels is None else LabeledImages(images[kept], labels[kept], data.names)
    return train, validation
