"""The speed matrix's attention layers alone, flaxdiff against PyTorch diffusers: what each head
width costs on each side, so a cell's ratio can be read against its attention.

For each attention the matrix's UNets have (batch 64, 16x16 pixels with 64 channels in heads of
8 / 32 / 64, the lower levels' 8x8 and 4x4), milliseconds per call, forward and forward +
backward (the gradients of the input and, for the block, of every weight too), of:

* the attention itself, softmax(q k^T / sqrt(d)) v over (batch, tokens, heads, head_dim):
  flaxdiff's CPU form (`flaxdiff.ops.attention`), and torch's
  `scaled_dot_product_attention` (its fused CPU flash-attention kernel, as diffusers calls it);
* the whole block (group norm, the q/k/v/out projections, the attention, the residual):
  `flaxdiff.unet.Attention` and diffusers' `Attention` as UNet2DModel builds it.

    python benchmarks/attention_heads.py          # ~3 minutes on 2 CPU cores

Results: benchmarks/results/attention_heads.json and a markdown table on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from conv_kernel_gradient import timed, torch_against_jax  # noqa: E402

# (batch, height = width, channels, head_dim, norm groups): the matrix cells' attention layers
SHAPES = [(64, 16, 64, 8, 8), (64, 16, 64, 32, 8), (64, 16, 64, 64, 8), (64, 8, 64, 8, 8),
          (64, 8, 128, 8, 32), (64, 4, 256, 8, 32)]


def measure_jax(repeats: int) -> dict:
    import flaxdiff  # noqa: F401  (flaxdiff's XLA flags, as in training)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flaxdiff import ops
    from flaxdiff.unet import Attention

    results = {}
    for shape in SHAPES:
        batch, size, channels, head_dim, groups = shape
        heads, tokens = channels // head_dim, size * size
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.float32) for _ in range(3))
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
        scale = head_dim ** -0.5
        op_forward = jax.jit(lambda q, k, v: ops.attention(q, k, v, scale))
        op_both = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ops.attention(q, k, v, scale) ** 2), argnums=(0, 1, 2)))
        graphdef, params = nnx.split(Attention(channels, head_dim, groups, 1e-5, rngs=nnx.Rngs(0), dtype=jnp.float32))
        block = lambda p, x: nnx.merge(graphdef, p)(x)
        block_forward = jax.jit(block)
        block_both = jax.jit(jax.grad(lambda p, x: jnp.sum(block(p, x) ** 2), argnums=(0, 1)))
        results[str(shape)] = {
            "flaxdiff attention forward": timed(lambda: jax.block_until_ready(op_forward(q, k, v)), repeats),
            "flaxdiff attention backward": timed(lambda: jax.block_until_ready(op_both(q, k, v)), repeats),
            "flaxdiff block forward": timed(lambda: jax.block_until_ready(block_forward(params, x)), repeats),
            "flaxdiff block backward": timed(lambda: jax.block_until_ready(block_both(params, x)), repeats)}
    return results


def measure_torch(repeats: int) -> dict:
    import torch
    from diffusers.models.attention_processor import Attention

    results = {}
    for shape in SHAPES:
        batch, size, channels, head_dim, groups = shape
        heads, tokens = channels // head_dim, size * size
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, requires_grad=True) for _ in range(3))
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        # as diffusers' AttnDownBlock2D / UNetMidBlock2D build it for UNet2DModel
        block = Attention(channels, heads=heads, dim_head=head_dim, rescale_output_factor=1.0, eps=1e-5,
                          norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
                          _from_deprecated_attn_block=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def op_forward():
            with torch.no_grad():
                return sdpa(q, k, v)

        def op_both():
            (sdpa(q, k, v) ** 2).sum().backward()

        def block_forward():
            with torch.no_grad():
                return block(x)

        def block_both():
            (block(x) ** 2).sum().backward()
        results[str(shape)] = {"torch attention forward": timed(op_forward, repeats),
                               "torch attention backward": timed(op_both, repeats),
                               "torch block forward": timed(block_forward, repeats),
                               "torch block backward": timed(block_both, repeats)}
    return results


def main() -> int:
    columns = [f"{side} {part} {stage}" for part in ("attention", "block") for stage in ("forward", "backward")
               for side in ("torch", "flaxdiff")]
    return torch_against_jax(__file__, __doc__, measure_torch, measure_jax,
                             "(batch, size, channels, head_dim, groups)", columns)


if __name__ == "__main__":
    sys.exit(main())
