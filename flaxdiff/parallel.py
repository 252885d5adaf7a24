"""Data parallelism: a 1-D mesh over every device of every process, axis "data".

The train step is written the way pmap programs are (per-device code, gradients averaged with
`lax.pmean` over "data"), as `jax.shard_map` under `jax.jit`. Batches enter as global arrays
assembled from each process's local slice; parameters and optimizer state are replicated.
"""

from __future__ import annotations

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
    """Put a pytree on every device of the mesh (the same value everywhere)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
