"""What a 3x3 convolution's kernel gradient costs on each side, and the rewrites that did not help.

The speed matrix (docs/speed.md) finds XLA:CPU's `transpose_copy_fusion` at 12-29% of every
training step: XLA computes a convolution's kernel gradient as a convolution with batch and
channels swapped, so it first copies the input and the output gradient into a
(channels, height, width, batch) layout. This measures, at the shapes of the UNets in the matrix
(stride 1, padding 1, NHWC, float32), milliseconds per call of:

* torch: `torch.ops.aten.convolution_backward` for the weight alone (oneDNN; NCHW as diffusers runs);
* xla: `jax.vjp` of the convolution with respect to the kernel, as flaxdiff's training step runs it
  (with flaxdiff's XLA flags);
* im2col: the nine shifted views of the padded input side by side, one (B*H*W, 9C) x (B*H*W, D)
  product;
* taps: nine products, one per kernel tap, each over a shifted view of the padded input;
* ynn_conv: xla, with `individual_convolution` added to the YNNPACK fusion types, so XLA hands
  convolutions to YNNPACK (a separate process: XLA reads its flags once).

Each JAX variant is checked against xla's result before it is timed.

    python benchmarks/conv_kernel_gradient.py          # ~3 minutes on 2 CPU cores

Results: benchmarks/results/conv_kernel_gradient.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# (batch, height = width, in channels, out channels): the small UNet at 32 px and its 16x16 and 8x8
# levels, the course UNet's widest 32 px level, the small UNet at batch 16, the ddpm preset at 64 px
SHAPES = [(64, 32, 32, 32), (64, 16, 64, 64), (64, 8, 64, 64), (16, 32, 32, 32), (64, 32, 64, 64),
          (16, 64, 128, 128)]
YNN_CONVOLUTION = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_convolution"


def timed(call, repeats: int, rounds: int = 3) -> float:
    """The fastest of `rounds` means over `repeats` calls, in milliseconds (after one warm-up call)."""
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def jax_variants():
    import jax
    import jax.numpy as jnp

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def xla(x, g, w):
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    def shifted(x):
        _, h, w, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]

    def im2col(x, g, w):
        b, h, wd, c = x.shape
        cols = jnp.concatenate(shifted(x), axis=-1).reshape(b * h * wd, 9 * c)
        return jax.lax.dot_general(cols, g.reshape(b * h * wd, -1), (((0,), (0,)), ((), ()))).reshape(w.shape)

    def taps(x, g, w):
        products = [jax.lax.dot_general(view, g, (((0, 1, 2), (0, 1, 2)), ((), ()))) for view in shifted(x)]
        return jnp.stack(products).reshape(w.shape)

    return {"xla": xla, "im2col": im2col, "taps": taps}


def measure_jax(names: list[str], repeats: int) -> dict:
    import flaxdiff  # noqa: F401  (flaxdiff's XLA flags, as in training)
    import jax
    import numpy as np

    variants = jax_variants()
    results = {}
    for shape in SHAPES:
        b, h, c, d = shape
        rng = np.random.default_rng(0)
        x, g = rng.standard_normal((b, h, h, c), np.float32), rng.standard_normal((b, h, h, d), np.float32)
        w = np.zeros((3, 3, c, d), np.float32)
        reference = np.asarray(jax.jit(variants["xla"])(x, g, w))
        row = {}
        for name in names:
            fn = jax.jit(variants["xla" if name == "ynn_conv" else name])
            error = float(np.abs(np.asarray(fn(x, g, w)) - reference).max() / np.abs(reference).max())
            assert error < 1e-5, f"{name} differs from xla's kernel gradient by {error:.1e} at {shape}"
            row[name] = timed(lambda fn=fn: jax.block_until_ready(fn(x, g, w)), repeats)
        results[str(shape)] = row
    return results


def measure_torch(repeats: int) -> dict:
    import torch

    results = {}
    for b, h, c, d in SHAPES:
        x, g = torch.randn(b, c, h, h), torch.randn(b, d, h, h)
        w = torch.zeros(d, c, 3, 3)

        def call():
            return torch.ops.aten.convolution_backward(g, x, w, [d], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])[1]
        with torch.no_grad():
            results[str((b, h, c, d))] = {"torch": timed(call, repeats)}
    return results


def in_subprocess(side: str, repeats: int, xla_flags: str | None = None, script: str = __file__) -> dict:
    """`script --worker side`'s results (its last stdout line, JSON), in a process of its own, so
    neither library's threads run beside the other's."""
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, script, "--worker", side, "--repeats", str(repeats)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_rows(output: str, parts: list[dict]) -> dict:
    """The workers' results merged per shape, written to `output` with the machine; returns the rows."""
    from bench_speed import machine

    rows = {shape: {k: v for part in parts for k, v in part[shape].items()} for shape in parts[0]}
    Path(output).write_text(json.dumps({"machine": machine(), "unit": "ms per call", "rows": rows}, indent=1)
                            + "\n")
    return rows


def torch_against_jax(script: str, doc: str, measure_torch, measure_jax, shape_header: str,
                      columns: list[str]) -> int:
    """The main() of a benchmark whose two workers, measure_torch(repeats) and measure_jax(repeats),
    each time every shape: runs them one process each, writes benchmarks/results/<script>.json and
    prints a markdown table of `columns` (milliseconds per call)."""
    name = Path(script).stem
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="calls per timed round (default: 5)")
    parser.add_argument("--output", default=str(HERE / "results" / f"{name}.json"),
                        help=f"results file (default: benchmarks/results/{name}.json)")
    parser.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((measure_torch if args.worker == "torch" else measure_jax)(args.repeats)))
        return 0
    rows = write_rows(args.output, [in_subprocess(side, args.repeats, script=script) for side in ("torch", "jax")])
    print(f"| {shape_header} | " + " | ".join(f"{c} ms" for c in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for shape, row in rows.items():
        print(f"| {shape} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="calls per timed round (default: 10)")
    parser.add_argument("--output", default=str(HERE / "results" / "conv_kernel_gradient.json"),
                        help="results file (default: benchmarks/results/conv_kernel_gradient.json)")
    parser.add_argument("--worker", choices=["torch", "jax", "ynn_conv"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        results = (measure_torch(args.repeats) if args.worker == "torch" else
                   measure_jax(["ynn_conv"] if args.worker == "ynn_conv" else ["xla", "im2col", "taps"], args.repeats))
        print(json.dumps(results))
        return 0
    rows = write_rows(args.output, [in_subprocess("torch", args.repeats), in_subprocess("jax", args.repeats),
                                    in_subprocess("ynn_conv", args.repeats, YNN_CONVOLUTION)])
    columns = ["torch", "xla", "im2col", "taps", "ynn_conv"]
    print("| (batch, size, in, out) | " + " | ".join(f"{c} ms" for c in columns) + " | xla / torch |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    for shape, row in rows.items():
        cells = " | ".join(f"{row[c]:.1f}" for c in columns)
        print(f"| {shape} | {cells} | {row['xla'] / row['torch']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
