"""Why flaxdiff unrolls its training loops on CPUs: XLA:CPU runs the convolutions of a backward
pass 10-40x slower inside a loop (a `lax.scan`, even unrolled) than outside one.

    python benchmarks/cpu_loop_convolutions.py

Prints milliseconds per call of a 3x3 convolution (batch 16, 32x32x32) forward, its kernel
gradient and its input gradient, called directly and inside a length-1 `lax.scan`.
See jax-ml/jax#12868 for the long-standing report of the same effect.
"""

import time

import flaxdiff  # noqa: F401  (the same XLA flags as training)
import jax
import jax.numpy as jnp


def bench(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1000


def main():
    x = jnp.ones((16, 32, 32, 32))
    w = jnp.ones((3, 3, 32, 32)) * 0.01

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(w, x):
        return jnp.sum(conv(x, w) ** 2)

    cases = {"forward": lambda w, x: conv(x, w), "kernel gradient": jax.grad(loss),
             "input gradient": jax.grad(lambda w, x: loss(w, x), argnums=1)}
    print(f"{'':16s} {'direct':>10s} {'in lax.scan':>12s}")
    for name, fn in cases.items():
        direct = jax.jit(fn)
        looped = jax.jit(lambda w, xs, fn=fn: jax.lax.scan(lambda c, x: (c, fn(w, x)), 0.0, xs)[1])
        print(f"{name:16s} {bench(direct, w, x):8.1f}ms {bench(looped, w, x[None]):10.1f}ms")


if __name__ == "__main__":
    main()
