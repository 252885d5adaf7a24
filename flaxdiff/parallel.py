"""Data parallelism: a 1-D mesh over every device of every process, axis "data".

The train step is written the way pmap programs are (per-device code, gradients averaged with
`lax.pmean` over "data"), as `jax.shard_map` under `jax.jit`. Batches enter as global arrays
assembled from each process's local slice; parameters and optimizer state are replicated.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize() when the job spans several processes.

    Explicit arguments win; otherwise JAX's own cluster detection (TPU pods, SLURM, ...) decides,
    and a plain single-process run (nothing detected, no arguments) stays single-process.
    """
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [name for name, value in (("--coordinator_address", coordinator_address),
                                            ("--num_processes", num_processes), ("--process_id", process_id))
                   if value is None]
        if missing:
            raise ValueError(f"multi-process training needs all of --coordinator_address, --num_processes and "
                             f"--process_id; missing {', '.join(missing)}")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    if _cluster_detected():
        jax.distributed.initialize()


def _cluster_detected() -> bool:
    """A multi-host environment JAX can auto-initialize: TPU pod slices and SLURM jobs."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")
    return bool(hosts and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over the given devices (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def per_device(tree):
    """Inside shard_map: replicated values marked as varying over "data", one copy per device.

    JAX differentiates a replicated input of a data-parallel computation by summing the
    per-device gradients over the mesh. Marking the weights as per-device copies first gives each
    device its own gradient, which the step then averages explicitly with `lax.pmean`.
    """
    return jax.lax.pcast(tree, AXIS, to="varying")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0, ndim: int = 4) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = AXIS
    return NamedSharding(mesh, P(*spec))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "--train_batch_size") -> None:
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices:
        raise ValueError(f"{what} {global_batch} is the global batch and must be divisible by the "
                         f"{devices} devices ({jax.devices()[0].platform}); use a multiple of {devices}")
    if global_batch % processes:
        raise ValueError(f"{what} {global_batch} must be divisible by the {processes} processes")


def global_batch(local: np.ndarray, mesh: Mesh, batch_axis: int) -> jax.Array:
    """A global array from this process's slice of the batch axis (jax.make_array_from_process_local_data)."""
    sharding = batch_sharding(mesh, batch_axis, local.ndim)
    return jax.make_array_from_process_local_data(sharding, local)


def replicate(tree, mesh: Mesh):
    """Put a pytree on every device of the mesh (the same value on every process and device)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(put, tree)


class DeviceDataset:
    """The whole uint8 dataset replicated on every device; each batch is gathered on the device.

    The host then sends only the (tiny) int32 image indices of a batch. Every device gathers its
    own part of the micro-batch axis from its full copy, so no data moves between devices, and the
    batch is bit for bit the one the host would have built: the trajectory does not change.
    """

    def __init__(self, images: np.ndarray, mesh: Mesh, batch_axis: int = 2):
        self.mesh, self.batch_axis = mesh, batch_axis
        self.num_images = len(images)
        self.nbytes_per_device = int(images.nbytes)
        self.data = replicate(np.ascontiguousarray(images), mesh)
        self._gathers: dict[int, object] = {}

    def indices(self, local_indices: np.ndarray) -> jax.Array:
        """The global int32 index array of a batch from this process's slice (what the host sends)."""
        return global_batch(np.asarray(local_indices, np.int32), self.mesh, self.batch_axis)

    def batch(self, local_indices: np.ndarray) -> jax.Array:
        """The global uint8 batch for this process's slice of indices, gathered on the devices."""
        indices = self.indices(local_indices)
        if indices.ndim not in self._gathers:
            self._gathers[indices.ndim] = jax.jit(functools.partial(gather_batch, mesh=self.mesh,
                                                                    batch_axis=self.batch_axis))
        return self._gathers[indices.ndim](self.data, indices)


def gather_batch(data: jax.Array, indices: jax.Array, mesh: Mesh, batch_axis: int = 2) -> jax.Array:
    """Traceable `data[indices]` for a replicated `data` and `indices` sharded over `batch_axis`:
    each device gathers its own slice of the batch from its own copy (no communication)."""
    spec = [None] * indices.ndim
    spec[batch_axis] = AXIS
    gather = jax.shard_map(lambda d, i: d[i], mesh=mesh, in_specs=(P(), P(*spec)), out_specs=P(*spec))
    return gather(data, indices)


def device_memory_bytes() -> int | None:
    """The smallest memory of this process's devices (accelerators), or None where JAX does not say (CPU)."""
    limits = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def host_memory_bytes() -> int | None:
    """Physical memory of this host, or None where the OS does not tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# Dense bf16 peak FLOP/s of one JAX device, by device_kind (TPU cores and GPUs), for MFU logging.
PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA L4": 121e12, "Tesla T4": 65e12,
    "Tesla V100-SXM2-16GB": 125e12, "Tesla P100-PCIE-16GB": 18.7e12, "NVIDIA A10G": 125e12,
}


def peak_flops_per_device() -> float | None:
    """The device's peak FLOP/s ($FLAXDIFF_PEAK_FLOPS overrides), or None when not known (CPUs)."""
    if os.environ.get("FLAXDIFF_PEAK_FLOPS"):
        return float(os.environ["FLAXDIFF_PEAK_FLOPS"])
    return PEAK_FLOPS.get(jax.devices()[0].device_kind)
