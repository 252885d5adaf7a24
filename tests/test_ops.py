"""flaxdiff.ops (the UNet's CPU-friendly layers) against the textbook formulas they replace:
values and gradients, every backend path, inside shard_map too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxdiff import ops, parallel
from flaxdiff.compat import enable_x64
from flaxdiff.unet import ACTIVATIONS


def _conv(x, w, strides=(1, 1), padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


def reference_group_norm(x, scale, bias, groups, eps, act):
    """torch.nn.GroupNorm written out in float64 numpy-style jnp (the test's own formula)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias
    return y if act is None else act(y)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(params=[True, False], ids=["cpu-kernels", "plain"])
def kernels(request, monkeypatch):
    monkeypatch.setattr(ops, "CPU_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("shape, groups, act", [((2, 8, 8, 32), 8, None), ((3, 4, 6, 48), 16, "silu"),
                                                ((2, 5, 5, 12), 3, "mish"), ((1, 4, 4, 64), 32, "gelu")])
def test_group_norm_values_and_gradients(kernels, shape, groups, act):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 1.5  # an offset mean: a one-pass variance would lose digits
    scale = rng.uniform(0.5, 1.5, shape[-1])
    bias = rng.standard_normal(shape[-1])
    weights = rng.standard_normal(shape)  # a loss that weights every output differently
    fn = ACTIVATIONS[act] if act else None

    def loss(f, x, s, b):
        return jnp.sum(f(x, s, b) * weights)

    ours = lambda x, s, b: ops.group_norm(x, s, b, groups, 1e-5, fn)
    with enable_x64():
        ref = lambda x, s, b: reference_group_norm(x, s, b, groups, 1e-5, fn)
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        want = ref(*args64)
        want_grads = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(*args64)
        want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
    args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    got = jax.jit(ours)(*args)
    got_grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(*args)
    assert got.dtype == jnp.float32
    assert relative_error(got, want) < 2e-6
    for name, g, w in zip(("x", "scale", "bias"), got_grads, want_grads):
        assert relative_error(g, w) < 2e-5, name


def test_group_norm_keeps_bfloat16(kernels):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 16)), jnp.bfloat16)
    y = ops.group_norm(x, jnp.ones(16), jnp.zeros(16), 4, 1e-5, jax.nn.silu)
    assert y.dtype == jnp.bfloat16
    ref = jax.nn.silu(reference_group_norm(x.astype(jnp.float32), 1.0, 0.0, 4, 1e-5, None))
    assert relative_error(y.astype(jnp.float32), ref) < 1e-2
    grad = jax.grad(lambda x: jnp.sum(ops.group_norm(x, jnp.ones(16), jnp.zeros(16), 4, 1e-5, None)
                                      .astype(jnp.float32) ** 2))(x)
    assert grad.dtype == jnp.bfloat16


def test_custom_gradients_inside_shard_map(kernels):
    """The hand-written backward passes inside the data-parallel step: parameter gradients of the
    per-device slices, averaged with pmean, equal the gradients of the whole batch."""
    mesh = parallel.make_mesh()
    devices = mesh.devices.size
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2 * devices, 8, 8, 16)), jnp.float32)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(16), jnp.float32),
              "down": jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32),
              "down_bias": jnp.asarray(rng.standard_normal(16), jnp.float32),
              "up": jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.1, jnp.float32),
              "up_bias": jnp.asarray(rng.standard_normal(8), jnp.float32)}

    def loss(p, x):
        h = ops.group_norm(x, p["scale"], p["bias"], 4, 1e-5, jax.nn.silu)
        h = ops.downsample_conv(h, p["down"], p["down_bias"], 1)
        return jnp.mean(ops.upsample_conv(h, p["up"], p["up_bias"]) ** 2)

    def local(p, x):  # as the train step does it
        value, grads = jax.value_and_grad(loss)(parallel.per_device(p), x)
        return jax.lax.pmean(value, parallel.AXIS), jax.lax.pmean(grads, parallel.AXIS)

    def summed(p, x):  # replicated weights, differentiated as they are: JAX sums over devices
        return jax.grad(loss)(p, x)

    specs = dict(mesh=mesh, in_specs=(P(), P(parallel.AXIS)))
    args = parallel.replicate(params, mesh), parallel.global_batch(np.asarray(x), mesh, 0)
    value, grads = jax.jit(jax.shard_map(local, out_specs=(P(), P()), **specs))(*args)
    sums = jax.jit(jax.shard_map(summed, out_specs=P(), **specs))(*args)
    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(params, x)
    assert relative_error(value, want_value) < 1e-5
    for name in params:
        assert relative_error(grads[name], want_grads[name]) < 1e-4, name
        assert relative_error(sums[name], devices * want_grads[name]) < 1e-4, name


# folded at 4x4 and 3x5; upsampled first at 2x2 and below (its convolution then at 4x4, or at 2x2
# through ops.small_image_conv on the CPU path), and at 1 x N
@pytest.mark.parametrize("shape, out_channels", [((2, 4, 4, 8), 8), ((1, 3, 5, 6), 10), ((2, 1, 1, 4), 4),
                                                 ((2, 2, 2, 4), 6), ((1, 1, 8, 3), 4)])
def test_upsample_conv_is_conv_of_the_upsampled_input(kernels, shape, out_channels):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out_channels)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.standard_normal(out_channels), jnp.float32)

    def reference(x, w, b):
        return _conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w) + b

    weights = jnp.asarray(rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], out_channels)), jnp.float32)
    got, want = jax.jit(ops.upsample_conv)(x, w, b), reference(x, w, b)
    assert got.shape == want.shape
    assert relative_error(got, want) < 2e-6
    grads = jax.grad(lambda *a: jnp.sum(ops.upsample_conv(*a) * weights), argnums=(0, 1, 2))(x, w, b)
    want_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * weights), argnums=(0, 1, 2))(x, w, b)
    for name, g, r in zip(("x", "kernel", "bias"), grads, want_grads):
        assert relative_error(g, r) < 2e-6, name


@pytest.mark.parametrize("padding", [0, 1])
# 2x2 down to 1x1: ops.small_image_conv on the CPU path
@pytest.mark.parametrize("shape", [(2, 8, 8, 6), (1, 6, 10, 4), (3, 2, 2, 6)])
def test_downsample_conv_values_and_gradients(kernels, padding, shape):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 5)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.standard_normal(5), jnp.float32)

    def reference(x, w, b):  # diffusers: F.pad(x, (0, 1, 0, 1)) then conv(padding=0), or conv(padding=1)
        if padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x, w, (2, 2), ((padding, padding), (padding, padding))) + b

    ours = lambda x, w, b: ops.downsample_conv(x, w, b, padding)
    want = reference(x, w, b)
    weights = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    assert relative_error(jax.jit(ours)(x, w, b), want) < 2e-6
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums=(0, 1, 2)))(x, w, b)
    want_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * weights), argnums=(0, 1, 2))(x, w, b)
    for name, g, r in zip(("x", "kernel", "bias"), grads, want_grads):
        assert relative_error(g, r) < 2e-6, name


@pytest.mark.parametrize("shape, kernel_size, padding, strides", [
    ((3, 2, 2, 6), 3, 1, (1, 1)), ((2, 1, 1, 4), 3, 1, (1, 1)), ((2, 1, 2, 5), 3, 1, (1, 1)),
    ((2, 2, 2, 4), 1, 0, (1, 1)),
    # Downsample2D from 2x2 to 1x1: diffusers' padding 1, and padding 0 after one zero row and column
    ((3, 2, 2, 6), 3, 1, (2, 2)), ((2, 2, 2, 4), 3, ((0, 1), (0, 1)), (2, 2)), ((2, 1, 2, 5), 3, 1, (2, 2)),
    # a stride that leaves more than one output pixel, and unequal sides
    ((2, 2, 2, 3), 2, ((1, 2), (0, 1)), (1, 2))])
def test_small_image_conv_values_and_gradients(shape, kernel_size, padding, strides):
    """The im2col form against the convolution, both in float64, and in float32 against that."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((kernel_size, kernel_size, shape[-1], 5)) * 0.3
    b = rng.standard_normal(5)
    pads = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    reference = lambda x, w, b: _conv(x, w, strides, pads) + b
    ours = lambda x, w, b: ops.small_image_conv(x, w, b, padding, strides)
    weights = rng.standard_normal(jax.eval_shape(reference, x, w, b).shape)
    loss = lambda f, *a: jnp.sum(f(*a) * weights)
    with enable_x64():
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, w, b)]
        want = np.asarray(reference(*args64))
        want_grads = [np.asarray(g) for g in jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(*args64)]
        assert relative_error(ours(*args64), want) < 1e-12  # the same sums, in another order
    args = [jnp.asarray(a, jnp.float32) for a in (x, w, b)]
    got = jax.jit(ours)(*args)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert relative_error(got, want) < 2e-6
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(*args)
    for name, g, r in zip(("x", "kernel", "bias"), grads, want_grads):
        assert relative_error(g, r) < 2e-6, name


@pytest.mark.parametrize("image, expected", [((4, 2, 2, 8), True), ((4, 1, 1, 8), True), ((4, 1, 2, 8), True),
                                             ((4, 3, 3, 8), False), ((4, 2, 8, 8), False)])
def test_small_image_conv_is_used_below_3x3_pixels_on_cpus(kernels, image, expected):
    """The UNet's convolutions take the im2col form at 2x2 pixels and below, on the CPU path only
    (and never for a 1x1 kernel), and give the same values as nnx.Conv either way."""
    from flax import nnx

    from flaxdiff.unet import conv
    assert ops.is_small_image_conv(image, (3, 3)) == (expected and kernels)
    assert not ops.is_small_image_conv(image, (1, 1))
    x = jnp.asarray(np.random.default_rng(8).standard_normal(image), jnp.float32)
    for stride in (1, 2):
        layer = conv(8, 6, 3, nnx.Rngs(0), jnp.float32, stride=stride)
        want = nnx.Conv.__call__(layer, x)
        assert relative_error(layer(x), want) < 2e-6, stride


@pytest.fixture(params=["plain", "cpu-whole", "cpu-in-chunks"])
def attention_path(request, monkeypatch):
    """The attention as TPUs/GPUs run it (plain), or the CPU attention in one piece, or forced into
    chunks of 2 (sample, head) pairs (a loop: the path attention over many tokens takes). Returns
    whether the CPU kernels are on."""
    monkeypatch.setattr(ops, "CPU_KERNELS", request.param != "plain")
    if request.param == "cpu-in-chunks":
        monkeypatch.setattr(ops, "_chunk", lambda pairs, tokens, chunk_bytes: 2 if pairs % 2 == 0 else 1)
    return request.param != "plain"


@pytest.mark.parametrize("shape", [(2, 16, 4, 8), (1, 9, 2, 16), (3, 5, 1, 4)])  # (B, N, heads, head_dim)
def test_attention_values_and_gradients(attention_path, shape):
    """The UNet's attention core (ops.attention on CPUs, jax.nn.dot_product_attention otherwise)
    against softmax(q k^T * scale) v in float64; the CPU backward pass recomputes the probabilities."""
    from flaxdiff.unet import _attention
    rng = np.random.default_rng(5)
    q, k, v, weights = (rng.standard_normal(shape) for _ in range(4))
    scale = shape[-1] ** -0.5

    def reference(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)

    with enable_x64():
        args64 = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        want = np.asarray(reference(*args64))
        want_grads = [np.asarray(g) for g in jax.grad(lambda *a: jnp.sum(reference(*a) * weights),
                                                      argnums=(0, 1, 2))(*args64)]
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    assert relative_error(jax.jit(_attention, static_argnums=3)(*args, scale), want) < 2e-6
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(_attention(*a, scale) * weights), argnums=(0, 1, 2)))(*args)
    for name, g, w in zip("qkv", grads, want_grads):
        assert relative_error(g, w) < 2e-5, name


@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="explicit sharding before jax 0.7 fails inside JAX "
                    "('Mesh of both lhs and rhs should match'); jax 0.7+ makes it the default of jax.make_mesh")
def test_unet_gradients_with_explicit_sharding(attention_path):
    """`jax.make_mesh` gives Explicit axes by default, so a user's own jitted step (notebook 1
    writes one) traces the UNet with the batch's sharding in its types: every layer, forward and
    backward, must be expressible there, and give the same loss and gradients as one device."""
    kernels = attention_path
    padding = 1 if kernels else 0  # both Downsample2D paddings, one per kernel path
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding

    from flaxdiff.unet import UNet2D, UNet2DConfig
    # levels of 4x4, 2x2 and 1x1: on the CPU path ops.small_image_conv at 2x2 and 1x1, Downsample2D
    # to 1x1 through it, Upsample2D from 1x1 and 2x2 upsampled first
    config = UNet2DConfig(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1,
                          block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=4,
                          down_block_types=("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"), downsample_padding=padding)
    unet = UNet2D(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
    t = rng.integers(0, 1000, 8).astype(np.int32)

    def loss_and_grads(unet, x, t):
        return nnx.value_and_grad(lambda u: jnp.mean((u(x, t) - x) ** 2))(unet)

    want_loss, want_grads = nnx.jit(loss_and_grads)(unet, x, t)
    mesh = jax.make_mesh((jax.device_count(),), (parallel.AXIS,), axis_types=(AxisType.Explicit,))
    nnx.update(unet, jax.device_put(nnx.state(unet), NamedSharding(mesh, P())))
    batch = [jax.device_put(a, NamedSharding(mesh, P(parallel.AXIS))) for a in (x, t)]
    loss, grads = nnx.jit(loss_and_grads)(unet, *batch)
    assert relative_error(loss, want_loss) < 1e-5
    # Per parameter, relative to its gradient's size, floored at 1e-3 of the largest gradient: the
    # attention keys' bias has a zero gradient (softmax ignores a shift of every score).
    floor = 1e-3 * max(np.abs(w).max() for w in jax.tree.leaves(want_grads))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.abs(g - w).max() / max(np.abs(w).max(), floor) < 1e-4, jax.tree_util.keystr(path)
