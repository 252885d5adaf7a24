"""XLA flags flaxdiff sets before JAX starts its CPU backend (imported first by the package).

On CPUs, XLA's own convolution kernels run at about half the speed of PyTorch's oneDNN ones;
routing convolutions and matmuls through YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=dot`)
closes that gap (docs/speed.md). It only affects the CPU
backend. Set FLAXDIFF_XLA_CPU_YNN=0 to leave XLA_FLAGS alone.
"""

import os

_YNN = "--xla_cpu_experimental_ynn_fusion_type"

if os.environ.get("FLAXDIFF_XLA_CPU_YNN", "1") != "0" and _YNN not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN}=dot".strip()
