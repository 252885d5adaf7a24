"""--streaming: batches from a Hugging Face `datasets` stream, for data larger than the disk or too
slow to decode ahead.

The stream is `load_dataset(..., streaming=True)` (a Hub dataset, or an image folder): shuffled in a
buffer seeded by --seed (`IterableDataset.shuffle`), split between processes by shards
(`datasets.distributed.split_dataset_by_node`), each image decoded, converted, resized and cropped
as it arrives (by --dataloader_num_workers threads). Memory is bounded by the shuffle buffer and the
prefetched batches. When the stream ends, the next epoch starts (`set_epoch`, a new shuffle).

Resume: each checkpoint stores the stream's position after the checkpoint's last batch
(`IterableDataset.state_dict()`, in the checkpoint's meta), and a resumed run restores it with
`load_state_dict`. What that guarantees:

* with `--shuffle_buffer_size 0` (no example shuffle; the stream's own order), the batches after
  the checkpoint are exactly the uninterrupted run's: the resumed run ends with the same weights,
  bit for bit (tests/test_stream.py);
* with a shuffle buffer, `datasets` saves the stream's read position but not the buffer's contents:
  the resumed run continues the interrupted epoch after the last image read, without repeating an
  image of that epoch, but the up to --shuffle_buffer_size images that sat in the buffer are left
  out of that epoch, and the order after the checkpoint is not the uninterrupted run's. The
  following epochs are whole. Every step's noise, timesteps and dropout follow the step number
  either way.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from ..data import (DataError, DataSpec, checked_labels, decode, folder_data_files, image_column, label_column, resize_and_crop,
                    resolve_dataset_name, to_mode)
from ..parallel import global_batch
from .feed import BATCH_AXIS, Prefetcher
from .options import OptionsError, TrainOptions


@dataclasses.dataclass
class StreamOrder:
    """The order's counts, for the loop: an epoch is the stream's length when the dataset says it,
    else --checkpointing_steps steps."""

    num_images: int | None
    micro_batch: int
    accumulation: int
    steps_per_epoch: int

    @property
    def step_size(self) -> int:
        return self.micro_batch * self.accumulation


class StreamFeed:
    """The Feed of a streaming run: this process's slice of each batch, read from the stream in
    order (the host path; there is no dataset to keep on the devices)."""

    step_inputs: tuple = ()
    gather = None
    device_data = None

    def __init__(self, spec: DataSpec, opts: TrainOptions, mesh, workers: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        kind, name = resolve_dataset_name(spec.dataset)
        if kind not in ("hub", "folder"):
            raise OptionsError(f"--streaming reads Hub datasets and image folders, not {kind} data: drop --streaming")
        try:
            if kind == "folder":
                stream = datasets.load_dataset("imagefolder", data_files=folder_data_files(name), split=spec.split,
                                                streaming=True)
            else:
                stream = datasets.load_dataset(name, spec.dataset_config_name, split=spec.split, streaming=True)
        except Exception as error:  # connection, missing repo, no such split: one message
            raise DataError(f"cannot stream {spec.dataset!r} (split {spec.split!r}): {error}") from error
        self.spec, self.mesh, self.workers = spec, mesh, max(1, workers)
        self.column = image_column(stream, spec.image_column)
        self.label_name, self.names = label_column(stream, spec.class_column) if spec.labels else (None, None)
        self.processes = jax.process_count()
        if opts.shuffle_buffer_size > 0:
            stream = stream.shuffle(seed=spec.seed, buffer_size=opts.shuffle_buffer_size)
        self.stream = split_dataset_by_node(stream, jax.process_index(), self.processes)
        known = stream.info.splits[spec.split].num_examples if stream.info.splits and spec.split in \
            stream.info.splits else None
        step_size = opts.train_batch_size * opts.gradient_accumulation_steps
        epoch_steps = known // step_size if known else opts.checkpointing_steps
        self.order = StreamOrder(known, opts.train_batch_size, opts.gradient_accumulation_steps, max(1, epoch_steps))
        self.epoch, self.iterator = 0, None
        self.states: dict[int, dict] = {}  # step -> the stream's position after that step's batch

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's stream position."""
        self.epoch = state["epoch"]
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(state["stream"])

    def state_at(self, step: int) -> dict:
        return self.states.pop(step)

    def _next_example(self) -> dict:
        while True:
            if self.iterator is None:
                self.stream.set_epoch(self.epoch)
                self.iterator = iter(self.stream)
            try:
                return next(self.iterator)
            except StopIteration:  # the stream ended: the next epoch, reshuffled
                self.epoch, self.iterator = self.epoch + 1, None

    def _prepare(self, example: dict, step: int, position: int) -> np.ndarray:
        spec = self.spec
        name = f"example {position} of step {step} in {spec.dataset}"
        image = to_mode(decode(example[self.column], name), spec.channels)
        crop = np.random.default_rng([spec.seed, 1, step, position])  # a function of where it lands
        return resize_and_crop(image, spec.resolution, spec.center_crop, crop)

    def batch(self, first: int, count: int):
        order = self.order
        per_process = order.micro_batch // self.processes
        images = np.empty((count, order.accumulation, per_process, self.spec.resolution, self.spec.resolution,
                           self.spec.channels), np.uint8)
        labels = np.empty(images.shape[:3], np.int32) if self.names is not None else None
        with ThreadPoolExecutor(self.workers) as pool:
            for k in range(count):
                examples = [self._next_example() for _ in range(order.accumulation * per_process)]
                step = first + k
                prepared = pool.map(lambda item: self._prepare(item[1], step, item[0]), enumerate(examples))
                images[k] = np.stack(list(prepared)).reshape(images.shape[1:])
                if labels is not None:
                    values = checked_labels(np.array([e[self.label_name] for e in examples]), self.names,
                                            f"column {self.label_name!r}")[0]
                    labels[k] = values.reshape(labels.shape[1:])
                self.states[step + 1] = {"epoch": self.epoch, "stream": self.stream.state_dict()}
        images = global_batch(images, self.mesh, BATCH_AXIS)
        return images if labels is None else (images, global_batch(labels, self.mesh, BATCH_AXIS))

    def prefetch(self, dispatches: list[tuple[int, int]], depth: int = 2) -> Prefetcher:
        return Prefetcher(self.batch, dispatches, depth)
