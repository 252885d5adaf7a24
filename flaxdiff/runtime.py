"""The JAX runtime a job starts: the persistent compilation cache and multi-host initialisation.

Called once at the start of train.py, sample.py and `python -m flaxdiff.evaluate`, before any
program is compiled.
"""

from __future__ import annotations

import os


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default: a second run starts without compiling.

    Uses $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/flaxdiff/jax.
    """
    import jax

    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/flaxdiff/jax")
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize() when the job spans several processes.

    Explicit arguments win; otherwise JAX's own cluster detection (TPU pods, SLURM, ...) decides,
    and a plain single-process run (nothing detected, no arguments) stays single-process.
    """
    import jax

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
    if cluster_detected():
        jax.distributed.initialize()


def cluster_detected(environ=None) -> bool:
    """An unambiguous multi-host environment that JAX can initialise by itself: a TPU pod slice
    with several workers, several TPU processes, or a SLURM job with several tasks. Colab, Kaggle
    (TPU_PROCESS_ADDRESSES=local) and a one-GPU box are single-host and stay so."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in environ and _count(environ.get("SLURM_NTASKS")) > 1:
        return True
    workers = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    processes = [a for a in environ.get("TPU_PROCESS_ADDRESSES", "").split(",") if a.strip() not in ("", "local")]
    return len(workers) > 1 or len(processes) > 1


def _count(value: str | None) -> int:
    try:
        return int(value or 1)
    except ValueError:
        return 1
