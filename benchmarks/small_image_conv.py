"""Why flaxdiff computes a convolution over a 2x2 image as one matrix product (`ops.small_image_conv`).

XLA:CPU compiles a 3x3 convolution over an image of at most 2x2 pixels into another convolution
(window trimmed to 2x2, batch and features swapped) that runs far below the speed of its
arithmetic. A UNet meets it at its lowest level when it has many down blocks for its image size:
train_unconditional's `ddpm` preset at 64 px has 14 such convolutions at 2x2 x 512, and at 32 px
also a Downsample2D (stride 2) from 2x2 to 1x1. Its Upsample2D from 1x1 and 2x2 is the third
layer measured: its convolution computed at the low resolution with the kernel folded (which saves
work from 3x3 pixels up) against upsampling first. This measures milliseconds per call, forward
and forward + backward (gradients of the input and the kernel), at the lowest levels' shapes and
their neighbours, 3x3 kernels with padding 1, of each layer (`conv`: stride 1; `down`: stride 2;
`up`: Upsample2D's convolution):

* xla: flaxdiff before this form: `conv`, `jax.lax.conv_general_dilated` as nnx.Conv calls it (with
  flaxdiff's XLA flags); `down`, `ops._downsample_cpu` (XLA's strided convolution forward, the
  space-to-depth form for the input's gradient); `up`, `ops.folded_upsample_conv`;
* im2col: `conv` and `down`, `flaxdiff.ops.small_image_conv`; `up`, `ops.upsample_conv` (upsample,
  then `small_image_conv` up to 2x2 pixels or XLA's convolution above), each checked against xla's values;
* torch: `torch.nn.functional.conv2d` (oneDNN; NCHW as diffusers runs it), after
  `torch.nn.functional.interpolate` for `up`.

    python benchmarks/small_image_conv.py          # ~2 minutes on 2 CPU cores

Results: benchmarks/results/small_image_conv.json and a markdown table on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from conv_kernel_gradient import timed, torch_against_jax  # noqa: E402

# (batch, height, width, in channels, out channels, layer), 3x3 kernels, padding 1; the input's size
SHAPES = [(16, 1, 1, 512, 512, "conv"), (16, 2, 2, 512, 512, "conv"), (16, 2, 2, 1024, 512, "conv"),
          (16, 3, 3, 512, 512, "conv"), (16, 4, 4, 512, 512, "conv"), (16, 2, 8, 512, 512, "conv"),
          (64, 2, 2, 64, 64, "conv"), (1, 2, 2, 512, 512, "conv"),
          (16, 2, 2, 512, 512, "down"), (64, 2, 2, 64, 64, "down"), (16, 4, 4, 512, 512, "down"),
          (16, 1, 1, 512, 512, "up"), (16, 2, 2, 512, 512, "up"), (64, 2, 2, 64, 64, "up"),
          (16, 4, 4, 512, 512, "up")]


def measure_jax(repeats: int) -> dict:
    import flaxdiff  # noqa: F401  (flaxdiff's XLA flags, as in training)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxdiff import ops

    results = {}
    for shape in SHAPES:
        n, h, w_, c, d, layer = shape
        xla = {"conv": lambda x, w, b: jax.lax.conv_general_dilated(
                   x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) + b,
               "down": lambda x, w, b: ops._downsample_cpu(x, w, b, 1),
               "up": ops.folded_upsample_conv}[layer]
        im2col = {"conv": lambda x, w, b: ops.small_image_conv(x, w, b, 1),
                  "down": lambda x, w, b: ops.small_image_conv(x, w, b, 1, (2, 2)),
                  "up": ops.upsample_conv}[layer]

        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, h, w_, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, d)) * 0.05, jnp.float32)
        b = jnp.zeros(d, jnp.float32)
        row = {}
        for name, fn in (("xla", xla), ("im2col", im2col)):
            forward = jax.jit(fn)
            both = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) ** 2), argnums=(0, 1)))
            row[f"{name} forward"] = timed(lambda: jax.block_until_ready(forward(x, w, b)), repeats)
            row[f"{name} backward"] = timed(lambda: jax.block_until_ready(both(x, w, b)), repeats)
        error = float(jnp.abs(im2col(x, w, b) - xla(x, w, b)).max() / jnp.abs(xla(x, w, b)).max())
        assert error < 1e-5, f"im2col differs from xla by {error:.1e} at {shape}"
        results[str(shape)] = row
    return results


def measure_torch(repeats: int) -> dict:
    import torch

    results = {}
    for shape in SHAPES:
        n, h, w_, c, d, layer = shape
        x = torch.randn(n, c, h, w_, requires_grad=True)
        stride = 2 if layer == "down" else 1

        def conv(x):
            if layer == "up":
                x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            return torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
        w = (torch.randn(d, c, 3, 3) * 0.05).requires_grad_()

        def forward():
            with torch.no_grad():
                return conv(x)

        def both():
            (conv(x) ** 2).sum().backward()
        results[str(shape)] = {"torch forward": timed(forward, repeats), "torch backward": timed(both, repeats)}
    return results


def main() -> int:
    columns = [f"{side} {part}" for part in ("forward", "backward") for side in ("torch", "xla", "im2col")]
    return torch_against_jax(__file__, __doc__, measure_torch, measure_jax,
                             "(batch, height, width, in, out, layer)", columns)


if __name__ == "__main__":
    sys.exit(main())
