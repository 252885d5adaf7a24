"""XLA flags flaxdiff sets before JAX starts its CPU backend (imported first by the package).

On CPUs, XLA's own convolution kernels run at about half the speed of PyTorch's oneDNN ones;
routing convolutions and matmuls through YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=dot`)
closes that gap (docs/speed.md). With `dot` alone, XLA rewrites every large reduction (a bias
gradient: a sum over batch and pixels) into a windowed reduction that runs ~35x slower than a
plain one; adding `reduce` hands those to YNNPACK as well. The flag is set only where it helps and
cannot hurt:

* only for the CPU backend: not when a TPU/GPU will be JAX's backend (backend.py), nor with
  FLAXDIFF_ACCELERATOR_PATHS=1;
* only when the installed jaxlib knows it (XLA aborts the process on an unknown flag): jaxlib
  0.8.1 was the first release with it;
* not when XLA_FLAGS already sets it, nor with FLAXDIFF_XLA_CPU_YNN=0.
"""

import os

from . import backend

YNN = "--xla_cpu_experimental_ynn_fusion_type"
YNN_SINCE = (0, 8, 1)  # the first jaxlib release whose XLA knows the flag (and both types below)
YNN_TYPES = "dot,reduce"


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """'0.8.1' -> (0, 8, 1); local or pre-release tails ('0.9.0.1', '0.10.0rc1') count by their numbers."""
    if not version:
        return None
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or None


def cpu_flags(environ=None, jaxlib_version: str | None = None) -> list[str]:
    """The XLA flags to add for this process (none when they do not apply)."""
    environ = os.environ if environ is None else environ
    if environ.get("FLAXDIFF_XLA_CPU_YNN", "1") == "0" or YNN in environ.get("XLA_FLAGS", ""):
        return []
    if backend.accelerator_expected(environ):
        return []
    version = version_tuple(jaxlib_version if jaxlib_version is not None else backend.installed("jaxlib"))
    if version is None or version < YNN_SINCE:
        return []
    return [f"{YNN}={YNN_TYPES}"]


def apply(environ=None) -> None:
    environ = os.environ if environ is None else environ
    flags = cpu_flags(environ)
    if flags:
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", ""), *flags]).strip()


apply()
