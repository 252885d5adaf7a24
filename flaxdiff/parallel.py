"""Data parallelism: a 1-D mesh over every device of every process, axis "data".

The train step is written the way pmap programs are (per-device code, gradients averaged with
`lax.pmean` over "data"), as `jax.shard_map` under `jax.jit`. Batches enter as global arrays
assembled from each process's local slice; parameters and optimizer state are replicated.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .compat import pcast_varying

AXIS = "data"


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
    return pcast_varying(tree, AXIS)


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


MEMORY_OVERRIDE = "FLAXDIFF_DEVICE_MEMORY"  # e.g. 16GB: a device's memory, set by hand (or simulated in tests)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'16GB', '512 MiB', '1.5e9' -> bytes."""
    number = text.strip().upper().rstrip("BIKMGT ")
    unit = text.strip().upper()[len(number):].strip()
    if unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: use e.g. 16GB, 512MiB or a number of bytes")
    return int(float(number) * _UNITS[unit])


def format_bytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def device_memory_bytes() -> int | None:
    """The smallest memory of this process's devices (accelerators), or None where JAX does not say
    (CPU). $FLAXDIFF_DEVICE_MEMORY (e.g. 16GB) sets it by hand."""
    if os.environ.get(MEMORY_OVERRIDE):
        return parse_bytes(os.environ[MEMORY_OVERRIDE])
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


# How long a barrier waits for the slowest process: long enough for a large model's compile on a
# loaded host.
BARRIER_TIMEOUT_SECONDS = 3600


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for a single process); each name once per run.

    Uses the coordination service's barrier, not a collective: on CPUs a collective over a new set
    of devices first connects them with gloo, whose setup gives up after a fixed 30 s."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client jax.distributed.initialize() made; Orbax uses it too

    client = distributed.global_state.client
    if client is None:  # several processes without jax.distributed (no coordination service)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, BARRIER_TIMEOUT_SECONDS * 1000)


def connect_processes(mesh: Mesh) -> None:
    """Connect the processes' devices for collectives now, with nothing else in flight: one sum over
    the mesh. On CPUs the first collective over a set of devices sets up gloo, whose setup fails when
    one device's program starts more than 30 s after another's; the train step's first all-reduce,
    behind the first batch's transfers, is a worse moment for it. Later collectives over the same
    devices reuse the connection. A no-op for a single process."""
    if jax.process_count() == 1:
        return
    barrier("connect processes")
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)),
                                                  np.ones(len(mesh.local_devices), np.int32))
    ones.block_until_ready()  # every device's input is there before the collective starts
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    if int(total.addressable_data(0)) != mesh.size:
        raise RuntimeError(f"the processes' devices summed to {int(total.addressable_data(0))}, not {mesh.size}")


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


def to_host(x) -> np.ndarray:
    """A replicated (or local) jax.Array as numpy, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)
