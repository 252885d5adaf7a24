"""Memory preflight: will the compiled train step fit a device? Asked before the first step, so a
step too big for the device stops with the figures and the flags that help, not with XLA's
out-of-memory trace after minutes of loading and compiling.
"""

from __future__ import annotations

import jax

from .. import parallel
from ..parallel import format_bytes
from .options import OptionsError, TrainOptions

HEADROOM = 0.95  # XLA and the runtime keep a little of a device's memory for themselves


def step_bytes_per_device(compiled) -> int | None:
    """What one device holds while the compiled step runs (XLA's memory analysis): its inputs and
    outputs (donated inputs counted once), its temporaries and its code. None where XLA does not say."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)


def device_capacity() -> tuple[int | None, str]:
    """A device's memory and what to call it: the accelerator's (memory_stats, or
    $FLAXDIFF_DEVICE_MEMORY), else the host memory CPU devices share."""
    per_device = parallel.device_memory_bytes()
    if per_device is not None:
        return per_device, f"a {jax.local_devices()[0].device_kind} device"
    host = parallel.host_memory_bytes()
    count = jax.local_device_count()
    return (host // count if host else None), f"host memory / {count} CPU device(s)"


def preflight(compiled, opts: TrainOptions) -> str:
    """The log line saying what the step needs of what a device has; an OptionsError naming the
    flags that help when it cannot fit."""
    need = step_bytes_per_device(compiled)
    room, device = device_capacity()
    if need is None or room is None:
        return "the step's memory use is unknown on this backend"
    if need > HEADROOM * room:
        per_device = opts.train_batch_size // max(1, jax.device_count())
        half = opts.train_batch_size // 2
        hints = [f"a smaller per-device batch with the same global batch (--train_batch_size {half} "
                 f"--gradient_accumulation_steps {2 * opts.gradient_accumulation_steps})" if half else
                 "a smaller --train_batch_size"]
        if not opts.gradient_checkpointing:
            hints.append("--gradient_checkpointing (recompute activations in the backward pass)")
        if opts.mixed_precision != "bf16":
            hints.append("--mixed_precision bf16 (half-size activations)")
        raise OptionsError(f"the train step needs {format_bytes(need)} per device but {device} has "
                           f"{format_bytes(room)} (a batch of {per_device} per device): try " + ", or ".join(hints))
    return f"the step needs {format_bytes(need)} of {format_bytes(room)} per device ({device})"
