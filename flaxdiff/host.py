"""The host: glibc malloc settings for XLA:CPU, giving the compiler's memory back, and CPU devices.

XLA:CPU allocates its buffers (a training step's temporaries are one large allocation, and
Eigen's convolution workspaces are large too) with glibc's malloc, which serves large blocks with
fresh `mmap`s and unmaps them on free. So every step touches gigabytes of new 4 KiB pages, and the
kernel faults and zeroes each one. With the glibc tunable `glibc.malloc.hugetlb=1` (glibc 2.35+),
malloc asks for transparent huge pages, 512 times fewer faults (what that saves is measured in
docs/speed.md).

glibc reads tunables only when a process starts, so the command-line tools (train.py,
sample.py, `python -m flaxdiff.evaluate`) restart themselves once with the tunable set, before
JAX is imported. FLAXDIFF_MALLOC_TUNING=0 turns that off. In a notebook or your own script, set
it yourself: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py`.
"""

from __future__ import annotations

import ctypes
import os
import sys

from . import backend

TUNABLE = "glibc.malloc.hugetlb=1"
_OFF = "FLAXDIFF_MALLOC_TUNING"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def wants_restart(environ=None) -> bool:
    """Whether this process should restart itself with the malloc tunable (see the module doc)."""
    environ = os.environ if environ is None else environ
    version = _glibc_version()
    return (sys.platform.startswith("linux") and version is not None and version >= (2, 35)
            and environ.get(_OFF, "1") != "0" and "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "")
            and not backend.accelerator_expected(environ))  # a CPU-host trick: TPU/GPU hosts run as they are


def restart_with_malloc_tuning() -> None:
    """Re-run this command (same interpreter, arguments and pid) with GLIBC_TUNABLES set; call it
    first thing in a CLI's main. Returns without doing anything where it does not apply."""
    if not wants_restart():
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # cannot exec (unusual sandboxes): run on, with the default allocator
        return


def release_free_memory() -> None:
    """Give memory that malloc holds but no longer uses back to the OS (glibc's malloc_trim).

    Called after XLA compiles the train step: the compiler's working memory is freed but stays
    mapped in the process otherwise, and would count in its peak.
    """
    if _glibc_version() is None:
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    On Linux it is VmHWM, the high-water mark of this program's own address space: ru_maxrss
    survives exec, so a train.py started from a big process (a notebook, pytest) would report its
    parent's size instead of its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Above this many multiply-adds per device and UNet evaluation (the UNet's estimated convolution
# work per image, unet_macs_per_image, times the images each device samples), or above this many
# images per device, one device per core is no faster than one device: each operation is then
# large enough for XLA:CPU to split well over the cores, and each per-core device streams its own
# copy of the weights (benchmarks/sampling_devices.py measures the crossover; docs/speed.md).
PER_CORE_MAX_MACS = 16e9
PER_CORE_MAX_IMAGES = 16


def unet_macs_per_image(unet_config: dict) -> float:
    """A UNet2DModel's 3x3-convolution multiply-adds for one image, estimated from its config: per
    level l (1/2**l of sample_size, block_out_channels[l] channels C), the resnets of the down
    (layers_per_block) and up (layers_per_block + 1) paths, two convolutions each, taken as C to C.
    Attention, the mid block and the channel changes are left out: an estimate for choosing the
    device count, within ~2x of the true count."""
    size = unet_config.get("sample_size", 32)
    height, width = (size, size) if isinstance(size, int) else size
    layers = unet_config.get("layers_per_block", 2)
    return sum((height >> level) * (width >> level) * 9 * channels**2 * (4 * layers + 2)
               for level, channels in enumerate(unet_config.get("block_out_channels", (64,))))


def cpu_devices_for(batch_size: int) -> int:
    """The per-core device count for a batch: its largest divisor up to the core count, so every
    device gets the same share."""
    return max(d for d in range(1, min(cpu_cores(), batch_size) + 1) if batch_size % d == 0)


def one_cpu_device_per_core(batch_size: int, environ=None, unet_config: dict | None = None) -> int | None:
    """Before JAX starts: make each CPU core its own JAX device for sampling (JAX_NUM_CPU_DEVICES).

    XLA:CPU splits each operation of one device over the cores, which the small batches of
    sampling amortise badly; a single-core device per core, each with its share of the batch, is
    faster for small and mid-sized UNets (docs/speed.md). The count is the largest divisor of
    batch_size up to the core count, so every device gets the same share. With `unet_config`
    (the model's diffusers config), large UNets keep one device when each device's share would
    exceed PER_CORE_MAX_MACS; so do large batches (more than PER_CORE_MAX_IMAGES per device).
    Nothing changes when the user already chose (JAX_NUM_CPU_DEVICES, or XLA_FLAGS'
    --xla_force_host_platform_device_count), and TPUs and GPUs are not affected. Returns the count set, or None. (Training keeps one device: its large
    batches gain nothing from the split.)
    """
    environ = os.environ if environ is None else environ
    if "JAX_NUM_CPU_DEVICES" in environ or "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
        return None
    if backend.accelerator_expected(environ):
        return None
    count = cpu_devices_for(batch_size)
    if batch_size / count > PER_CORE_MAX_IMAGES:
        return None
    if unet_config is not None and unet_macs_per_image(unet_config) * batch_size / count > PER_CORE_MAX_MACS:
        return None
    if count > 1:
        environ["JAX_NUM_CPU_DEVICES"] = str(count)
        return count
    return None
