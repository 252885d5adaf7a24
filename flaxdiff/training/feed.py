"""The feed: which images reach which device at each optimizer step.

* Order: a step's global batch is a slice of its epoch's permutation, a pure function of
  (seed, epoch) (`BatchOrder`), so a resumed run sees the batches the uninterrupted one saw.
* Process slice: each process takes only its contiguous part of every global batch.
* Placement: the uint8 dataset stays on the host (batches gathered there and prefetched on a
  thread) or lives in every device's memory (`DeviceDataset`: the host sends int32 indices and
  the train step gathers the images inside its own program); `dataset_placement` decides.

A dispatch's batch has shape (K steps, accumulation, micro_batch, H, W, C), sharded over the
micro-batch axis (BATCH_AXIS); with the dataset on the devices, (K, accumulation, micro_batch).
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from .. import parallel
from ..backend import accelerator_paths
from ..data import DataError
from ..parallel import AXIS, format_bytes, global_batch, replicate
from .options import OptionsError

BATCH_AXIS = 2  # (K, accumulation, micro_batch, ...)


# --------------------------------------------------------------------------- order
def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of an epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch, 7]).permutation(num_images)


@dataclasses.dataclass(frozen=True)
class BatchOrder:
    """Which images form the global batch of each optimizer step.

    A step's batch has shape (accumulation, micro_batch); steps_per_epoch = N // (accumulation *
    micro_batch) (the last partial batch of an epoch is dropped, so shapes stay static).
    """

    num_images: int
    micro_batch: int  # --train_batch_size, global
    accumulation: int
    seed: int

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise DataError(f"the dataset has {self.num_images} images, fewer than one optimizer step needs "
                            f"(train_batch_size {self.micro_batch} x gradient_accumulation_steps "
                            f"{self.accumulation}); lower --train_batch_size")

    @property
    def step_size(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.step_size

    def indices(self, step: int) -> np.ndarray:
        """(accumulation, micro_batch) image indices of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.num_images, self.seed, epoch)
        flat = order[within * self.step_size:(within + 1) * self.step_size]
        return flat.reshape(self.accumulation, self.micro_batch)


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous part of the micro-batch axis (the last) of a global batch."""
    per_process = indices.shape[-1] // process_count
    return indices[..., process_index * per_process:(process_index + 1) * per_process]


# --------------------------------------------------------------------------- placement
AUTO_SHARE = 0.25  # --dataset_on_device auto: at most this share of a device's memory


def dataset_placement(mode: str, nbytes: int) -> tuple[bool, str]:
    """Whether the uint8 dataset of `nbytes` stays in device memory (--dataset_on_device), and why.

    Every device holds a full copy. On TPUs/GPUs it sits in the device's own memory and saves the
    per-step host-to-device copy of the batch; `auto` takes that when the dataset needs at most
    AUTO_SHARE of the device's memory. CPU devices live in host memory, where a copy per device
    gains nothing (measured: benchmarks/bench_data_path.py), so `auto` keeps the host path there
    (unless the process takes the TPU/GPU paths, flaxdiff/backend.py); `yes` still works, counted
    against the host's RAM.
    """
    if mode == "no":
        return False, "on the host (--dataset_on_device no)"
    per_device = parallel.device_memory_bytes()
    if per_device is not None:
        need, room = nbytes, per_device
        where = f"a {jax.local_devices()[0].device_kind} device's {format_bytes(room)}"
    else:
        if mode == "auto" and not accelerator_paths():
            return False, "on the host (CPU devices share host memory; --dataset_on_device yes to copy it to each)"
        need, room = nbytes * jax.local_device_count(), parallel.host_memory_bytes()
        where = f"host memory ({format_bytes(room or 0)}) for {jax.local_device_count()} CPU device copies"
    if mode == "auto":
        if need <= AUTO_SHARE * room:
            return True, f"in device memory ({format_bytes(nbytes)} per device)"
        return False, (f"on the host: {format_bytes(need)} is more than {AUTO_SHARE:.0%} of {where} "
                       "(--dataset_on_device yes to override)")
    if room is not None and need > 0.9 * room:
        raise OptionsError(f"--dataset_on_device yes: the dataset needs {format_bytes(need)} as uint8 but {where} "
                           "cannot hold it next to the model; use --dataset_on_device no (batches gathered on "
                           "the host and prefetched) or fewer images (--max_train_samples)")
    return True, f"in device memory ({format_bytes(nbytes)} per device, --dataset_on_device yes)"


class DeviceDataset:
    """The whole uint8 dataset replicated on every device; each batch is gathered on the device.

    The host then sends only the (tiny) int32 image indices of a batch. Every device gathers its
    own part of the micro-batch axis from its full copy, so no data moves between devices, and the
    batch is bit for bit the one the host would have built: the trajectory does not change.
    """

    def __init__(self, arrays, mesh: Mesh, batch_axis: int = BATCH_AXIS):
        """arrays: the images, or a tuple (images, labels): one row per image each."""
        self.mesh, self.batch_axis = mesh, batch_axis
        self.data = replicate(jax.tree.map(np.ascontiguousarray, arrays), mesh)

    def indices(self, local_indices: np.ndarray) -> jax.Array:
        """The global int32 index array of a batch from this process's slice (what the host sends)."""
        return global_batch(np.asarray(local_indices, np.int32), self.mesh, self.batch_axis)


def gather_batch(data, indices: jax.Array, mesh: Mesh, batch_axis: int = BATCH_AXIS):
    """Traceable `data[indices]` for replicated `data` (an array, or a tuple of arrays with one row
    per image) and `indices` sharded over `batch_axis`: each device gathers its own slice of the
    batch from its own copy (no communication)."""
    spec = [None] * indices.ndim
    spec[batch_axis] = AXIS
    gather = jax.shard_map(lambda d, i: jax.tree.map(lambda a: a[i], d), mesh=mesh, in_specs=(P(), P(*spec)),
                           out_specs=P(*spec))
    return gather(data, indices)


# --------------------------------------------------------------------------- the feed
class Feed:
    """The batches of a run: this process's slice of each global batch, on the host or gathered on
    the devices, prepared ahead of the device by `prefetch`."""

    def __init__(self, images: np.ndarray, order: BatchOrder, mesh: Mesh, on_device: bool,
                 labels: np.ndarray | None = None):
        """labels: int32 (N,) class labels for a class-conditional run; batches are then (images, labels)."""
        self.order, self.mesh = order, mesh
        arrays = images if labels is None else (images, labels)
        if on_device:  # the host sends only indices; the step gathers each device's part
            self.arrays, self.device_data = None, DeviceDataset(arrays, mesh)
            self.step_inputs = (self.device_data.data,)
            self.gather = functools.partial(gather_batch, mesh=mesh, batch_axis=BATCH_AXIS)
        else:
            self.arrays, self.device_data = arrays, None
            self.step_inputs, self.gather = (), None

    def local_indices(self, first: int, count: int) -> np.ndarray:
        """(K, accumulation, micro_batch / processes): this process's image indices of K steps."""
        return np.stack([process_slice(self.order.indices(s), jax.process_index(), jax.process_count())
                         for s in range(first, first + count)])

    def batch(self, first: int, count: int) -> jax.Array:
        """The global batch (images, or indices with the dataset on the devices) of steps first..first+count."""
        indices = self.local_indices(first, count)
        if self.device_data is not None:
            return self.device_data.indices(indices)
        return jax.tree.map(lambda a: global_batch(a[indices], self.mesh, BATCH_AXIS), self.arrays)

    def prefetch(self, dispatches: list[tuple[int, int]], depth: int = 2) -> "Prefetcher":
        return Prefetcher(self.batch, dispatches, depth)

    def state_at(self, step: int) -> dict | None:
        """What a checkpoint at `step` must keep of the feed: nothing, the order is a function of the step."""
        return None


class Prefetcher:
    """Prepares the next batches on a background thread, ahead of the device."""

    def __init__(self, make_batch, steps: list[tuple[int, int]], depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(make_batch, steps), daemon=True)
        self.thread.start()

    def _run(self, make_batch, steps):
        try:
            for start, count in steps:
                self.queue.put(make_batch(start, count))
        except BaseException as error:  # re-raised in the consumer, never lost
            self.queue.put(error)

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
