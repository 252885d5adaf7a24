"""The UNet's layers that XLA:CPU runs badly when written the obvious way, rewritten with the same math.

Each function here equals its textbook form to float rounding (the tests compare values and
gradients), and `unet.py` uses them for every forward and backward pass:

* `upsample_conv`: diffusers' Upsample2D, a 3x3 convolution of the nearest-neighbour 2x upsampled
  input. Upsampling repeats each pixel 2x2, so each of the four output phases sees only a 2x2
  neighbourhood of the *low-resolution* input, through 3x3 weights folded (summed) into 2x2 ones.
  One 2x2 convolution at the low resolution with 4x the output channels, then an interleave:
  2.25x fewer FLOPs, and the 4x larger upsampled tensor is never built (nor kept for the
  backward pass). Used on every backend.
* `group_norm` (CPU only): torch.nn.GroupNorm with its activation fused, with a hand-written
  backward pass whose per-channel sums are matrix-vector products (library GEMV calls on XLA:CPU)
  instead of the strided reductions XLA:CPU emits for the autodiff version.
* `downsample_conv` (CPU only): the stride-2 3x3 convolution of Downsample2D, whose input gradient
  XLA:CPU computes as an lhs-dilated convolution through a slow generic kernel; here the input
  gradient is that of the same convolution written as a stride-1 2x2 convolution over the
  space-to-depth input (a fast kernel).
* `small_image_conv` (CPU only): a stride-1 convolution over an image of at most 2x2 pixels (the
  lowest level of a UNet with many down blocks, such as train_unconditional's `ddpm` preset at
  64 px), which XLA:CPU rewrites into a form that runs 30-60x slower than its arithmetic, forward
  and backward; here it is one matrix product over the kernel's shifted views of the padded input.
* `attention` (CPU only): softmax attention as batched matmuls over (sample, head) pairs, the output
  normalised after the product with v; the backward pass recomputes the probabilities from q, k
  and the saved log-sum-exp instead of keeping them. Under a gradient both passes run in chunks of
  pairs one after another (a loop), so that each chunk's scores stay in cache, as flash attention
  blocks them; sampling runs in one piece.

TPUs and GPUs keep the plain formulations of the last four (their compilers handle them well).
`benchmarks/bench_speed.py` measures the effect; docs/speed.md has the figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .backend import accelerator_paths
from .compat import leading_axis_sharded, pcast_varying, varying_axes

# None: the CPU formulations unless the process takes the TPU/GPU paths (flaxdiff/backend.py).
# Tests set True / False to check both paths.
CPU_KERNELS: bool | None = None
_NHWC = ("NHWC", "HWIO", "NHWC")


def use_cpu_kernels() -> bool:
    return not accelerator_paths() if CPU_KERNELS is None else CPU_KERNELS


def _vary_like(param, x):
    """A replicated parameter marked as varying like x, so a custom_vjp may return its cotangent
    computed from x's per-device data inside shard_map (JAX inserts the psum when it transposes
    the cast, exactly as it does for built-in primitives)."""
    axes = tuple(sorted(varying_axes(x) - varying_axes(param)))
    return pcast_varying(param, axes) if axes else param


def _after(x, cotangent):
    """x, made to depend on a backward-pass value at no cost (0 * c is not folded away for floats).

    XLA:CPU schedules work as early as its inputs allow, and it drops the optimization barriers
    that keep rematerialisation in the backward pass, so a recomputation from forward-pass values
    would run during the forward pass and its result would be held until used. Computing it from
    `_after(x, cotangent)` keeps it in the backward pass. Both have the batch as their leading
    axis and the same rank: each sample depends on its own cotangent's first element, so a batch
    sharded over devices (explicitly or in shard_map) needs no communication.
    """
    first = cotangent[(slice(None),) + (slice(0, 1),) * (cotangent.ndim - 1)]  # (B, 1, ..., 1)
    return x + (0.0 * first).astype(x.dtype)


def _conv(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


# --------------------------------------------------------------------------- group norm
def group_norm(x, scale, bias, num_groups: int, eps: float, act=None):
    """act(torch.nn.GroupNorm(x)) on NHWC: biased variance over (H, W, C / G), statistics in float32."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if use_cpu_kernels():
        batch, channels = x.shape[0], x.shape[-1]
        gamma = jnp.broadcast_to(_vary_like(scale, xf), (batch, channels))
        beta = jnp.broadcast_to(_vary_like(bias, xf), (batch, channels))
        y = _group_norm_act(xf, gamma, beta, num_groups, eps, act)
    else:
        b, h, w, c = x.shape
        g = xf.reshape(b, h, w, num_groups, c // num_groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c) * scale + bias
        y = y if act is None else act(y)
    return y.astype(dtype)


def _sum_hw(x):
    """(B, H, W, C) -> (B, C) sums over H and W, as a batched product with ones (a GEMV on CPU)."""
    ones = jnp.ones(x.shape[:-1], x.dtype)
    return jax.lax.dot_general(ones, x, (((1, 2), (1, 2)), ((0,), (0,))))


def _group_sum(per_channel, num_groups: int):
    """(B, C) -> (B, C): each channel's value replaced by the sum over its group."""
    b, c = per_channel.shape
    sums = per_channel.reshape(b, num_groups, c // num_groups).sum(-1)
    return jnp.repeat(sums, c // num_groups, axis=-1)


def _bc(v):  # (B, C) -> (B, 1, 1, C)
    return v[:, None, None, :]


def _statistics(x, num_groups: int, eps: float):
    """Per (sample, channel): the group's mean and 1/std, two-pass like torch (no E[x^2] - E[x]^2)."""
    _, h, w, c = x.shape
    count = h * w * (c // num_groups)
    mean = _group_sum(_sum_hw(x), num_groups) / count
    centred = x - _bc(mean)
    var = _group_sum(_sum_hw(centred * centred), num_groups) / count
    return mean, jax.lax.rsqrt(var + eps)


def _normalise(x, mean, rstd, gamma, beta):
    a = gamma * rstd  # y = (x - mean) * rstd * gamma + beta, as one multiply-add per element
    return x * _bc(a) + _bc(beta - mean * a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_act(x, gamma, beta, num_groups, eps, act):
    return _group_norm_act_fwd(x, gamma, beta, num_groups, eps, act)[0]


def _group_norm_act_fwd(x, gamma, beta, num_groups, eps, act):
    mean, rstd = _statistics(x, num_groups, eps)
    y = _normalise(x, mean, rstd, gamma, beta)
    return (y if act is None else act(y)), (x, mean, rstd, gamma, beta)


def _group_norm_act_bwd(num_groups, eps, act, residuals, d_out):
    """The group-norm gradient (e.g. Wu & He 2018's batch-norm derivation, per group):
    dx = rstd * (dy * gamma - mean_g(dy * gamma) - xhat * mean_g(dy * gamma * xhat)).
    The activation's input is recomputed rather than kept from the forward pass."""
    x, mean, rstd, gamma, beta = residuals
    _, h, w, c = x.shape
    count = h * w * (c // num_groups)
    if act is None:
        dy = d_out
    else:
        _, act_vjp = jax.vjp(act, _normalise(x, mean, rstd, gamma, beta))
        dy = act_vjp(d_out)[0]
    xhat = (x - _bc(mean)) * _bc(rstd)
    sum_dy = _sum_hw(dy)  # (B, C): also the gradient of beta
    sum_dy_xhat = _sum_hw(dy * xhat)  # (B, C): also the gradient of gamma
    mean_dxhat = _group_sum(sum_dy * gamma, num_groups) / count
    mean_dxhat_xhat = _group_sum(sum_dy_xhat * gamma, num_groups) / count
    dx = _bc(rstd) * (dy * _bc(gamma) - _bc(mean_dxhat) - xhat * _bc(mean_dxhat_xhat))
    return dx, sum_dy_xhat, sum_dy


_group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


# --------------------------------------------------------------------------- upsample + conv
# Nearest 2x upsampling, then a 3x3 convolution (padding 1): output row 2i + a reads upsampled rows
# 2i + a - 1 .. 2i + a + 1, i.e. input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1). So phase a
# sees two input rows, the first through kernel rows _FOLD[a][0], the second through _FOLD[a][1];
# the same holds for columns.
_FOLD = (((0,), (1, 2)), ((0, 1), (2,)))


def _folded_kernel(kernel):
    """(3, 3, C, D) -> (2, 2, C, 4D): the 2x2 kernels of the four output phases, phase-major."""
    phases = []
    for a in range(2):
        rows = [sum(kernel[i] for i in _FOLD[a][t]) for t in range(2)]  # 2 x (3, C, D)
        for b in range(2):
            taps = [[sum(row[j] for j in _FOLD[b][s]) for s in range(2)] for row in rows]
            phases.append(jnp.stack([jnp.stack(pair) for pair in taps]))  # (2, 2, C, D)
    return jnp.concatenate(phases, axis=-1)


def folding_saves_work(height: int, width: int) -> bool:
    """Whether the folded form does fewer multiply-adds than the textbook one over an input of
    height x width pixels: (H+1)(W+1) positions x 4 taps x 4D outputs against 4HW x 9 taps x D. At
    2x2 and below it does as many or more, and folding the kernel (4 times its size, on every call)
    is then pure cost (benchmarks/small_image_conv.py)."""
    return 4 * (height + 1) * (width + 1) < 9 * height * width


def upsample_conv(x, kernel, bias):
    """conv3x3(nearest_upsample_2x(x)) + bias (padding 1), NHWC, HWIO: at x's resolution; on CPUs
    only where that does less work, else as written (accelerators: not measured there)."""
    if not use_cpu_kernels() or folding_saves_work(*x.shape[1:3]):
        return folded_upsample_conv(x, kernel, bias)
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if is_small_image_conv(upsampled.shape, kernel.shape[:2]):
        return small_image_conv(upsampled, kernel, bias, 1)
    return _conv(upsampled, kernel.astype(x.dtype)) + bias.astype(x.dtype)


def folded_upsample_conv(x, kernel, bias):
    """upsample_conv computed at x's resolution with the folded kernel."""
    b, h, w, _ = x.shape
    d = kernel.shape[-1]
    folded = _folded_kernel(kernel.astype(jnp.float32)).astype(x.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = _conv(padded, folded, padding="VALID").reshape(b, h + 1, w + 1, 2, 2, d)  # (B, H+1, W+1, a, b, D)
    # phase (a, b) of output pixel (i, j) is at phases[:, i + a, j + b, a, b]
    rows = [jnp.stack([phases[:, a:a + h, c:c + w, a, c] for c in range(2)], axis=3) for a in range(2)]
    y = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, D)
    # One axis pair per reshape: with explicit sharding (jax.make_mesh's default) JAX accepts a
    # reshape that merges or splits one group of axes, not two at once.
    y = y.reshape(b, h, 2, 2 * w, d)
    return y.reshape(b, 2 * h, 2 * w, d) + bias.astype(x.dtype)


# --------------------------------------------------------------------------- conv over a tiny image
# XLA:CPU compiles a 3x3 convolution over an image of at most 2x2 pixels (stride 1, or Downsample2D's
# stride 2 down to 1x1) into a different convolution (its window trimmed to 2x2, batch and features
# swapped) that runs many times slower than the same products written out, and its gradients as
# slowly; at 3x3 pixels and up, or 2 x N, it runs at full speed (benchmarks/small_image_conv.py).
# Below that size the kernel's views of the padded input are tiny, so one product over all of them
# side by side (im2col) costs nothing.
SMALL_IMAGE_SIDE = 2


def is_small_image_conv(image_shape, kernel_size) -> bool:
    """Whether a convolution over NHWC images of `image_shape` goes through small_image_conv."""
    height, width = image_shape[-3:-1]
    return use_cpu_kernels() and max(kernel_size) > 1 and max(height, width) <= SMALL_IMAGE_SIDE


def _pad_pairs(padding):
    """An int (the same zeros on every side) or ((top, bottom), (left, right)), as nnx.Conv takes it."""
    return ((padding, padding),) * 2 if isinstance(padding, int) else tuple(tuple(p) for p in padding)


def small_image_conv(x, kernel, bias, padding, strides=(1, 1)):
    """A convolution (NHWC, HWIO, `padding` zeros: an int or ((top, bottom), (left, right))) + bias,
    as one product of the kernel's views of the padded input, side by side, with the flattened kernel."""
    kh, kw, c, d = kernel.shape
    (top, bottom), (left, right) = _pad_pairs(padding)
    sh, sw = strides
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    views = [padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    # (B, H, W, kh * kw * C) x (kh * kw * C, D): the row order (i, j, c) is the kernel's own
    return jnp.concatenate(views, axis=-1) @ kernel.astype(x.dtype).reshape(kh * kw * c, d) + bias.astype(x.dtype)


# --------------------------------------------------------------------------- strided conv
def downsample_conv(x, kernel, bias, padding: int):
    """diffusers Downsample2D's 3x3 stride-2 convolution: padding 1 on every side, or (padding 0)
    one zero row and column after the input."""
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    if not use_cpu_kernels():
        return _strided_conv(x, kernel, padding) + bias
    if is_small_image_conv(x.shape, kernel.shape[:2]):  # down to 1x1 (a UNet's lowest level)
        return small_image_conv(x, kernel, bias, ((padding, 1), (padding, 1)), (2, 2))
    return _downsample_cpu(x, _vary_like(kernel, x), _vary_like(bias, x), padding)


def _strided_conv(x, kernel, padding: int):
    return _conv(x, kernel, (2, 2), ((padding, 1), (padding, 1)))


def _space_to_depth_conv(x, kernel, padding: int):
    """The same convolution as a stride-1 2x2 convolution over the space-to-depth padded input
    (the kernel's missing fourth row and column are zeros)."""
    b, h, w, c = x.shape
    d = kernel.shape[-1]
    padded = jnp.pad(x, ((0, 0), (padding, 2 - padding), (padding, 2 - padding), (0, 0)))  # even size
    hs, ws = (h + 2) // 2, (w + 2) // 2
    # (B, 2hs, 2ws, C) -> (B, hs, 2, ws, 2, C), one axis per reshape (explicit sharding, as above)
    s2d = padded.reshape(b, hs, 2, 2 * ws, c).reshape(b, hs, 2, ws, 2, c)
    s2d = s2d.transpose(0, 1, 3, 2, 4, 5).reshape(b, hs, ws, 4 * c)
    k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(2, 2, 2, 2, c, d)
    k = k.transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, d)  # [ty, tx, (a, b, c), d]
    return _conv(s2d, k, padding="VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _downsample_cpu(x, kernel, bias, padding):
    return _strided_conv(x, kernel, padding) + bias


def _downsample_cpu_fwd(x, kernel, bias, padding):
    return _strided_conv(x, kernel, padding) + bias, (x, kernel)


def _downsample_cpu_bwd(padding, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x: _space_to_depth_conv(x, kernel, padding), x)[1](g)[0]
    dkernel = jax.vjp(lambda k: _strided_conv(x, k, padding), kernel)[1](g)[0]
    return dx, dkernel, g.sum(axis=(0, 1, 2))


_downsample_cpu.defvjp(_downsample_cpu_fwd, _downsample_cpu_bwd)


# --------------------------------------------------------------------------- attention
# How many (sample, head) pairs' scores one chunk holds, run one chunk after another (a loop).
# Attention over 16x16 pixels with diffusers' 8-wide heads is all memory traffic (its products are
# 8 deep), so training, which passes over the scores several times, runs fastest when a chunk's
# scores stay in a core's cache. Sampling (no backward pass) runs fastest in one piece; its chunks
# only bound the scores' memory when there are many tokens. (Measurements: docs/speed.md.)
_TRAINING_CHUNK_BYTES = 4 << 20
_SAMPLING_CHUNK_BYTES = 64 << 20


def _chunk(pairs: int, tokens: int, chunk_bytes: int) -> int:
    """The largest divisor of `pairs` whose scores (chunk x tokens x tokens float32) fit chunk_bytes."""
    most = max(1, min(pairs, chunk_bytes // (tokens * tokens * 4)))
    return max(c for c in range(1, most + 1) if pairs % c == 0)


def _over_chunks(function, chunk_bytes: int, *arrays):
    """function over the leading axis in chunks, one after another (a loop), so each chunk's
    intermediates fit chunk_bytes; the results are concatenated. In one piece where that axis is
    sharded in the arrays' types (a loop cannot run over a sharded axis)."""
    pairs, tokens = arrays[0].shape[:2]
    chunk = _chunk(pairs, tokens, chunk_bytes)
    if chunk == pairs or leading_axis_sharded(arrays[0]):
        return function(*arrays)
    split = [a.reshape(pairs // chunk, chunk, *a.shape[1:]) for a in arrays]
    results = jax.lax.map(lambda chunk_arrays: function(*chunk_arrays), tuple(split))
    return jax.tree.map(lambda r: r.reshape(pairs, *r.shape[2:]), results)


def _pairs(a):  # (B, N, heads, d) -> (B * heads, N, d)
    b, n, heads, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b * heads, n, d)


def _unpairs(a, batch: int):  # (B * heads, N, d) -> (B, N, heads, d)
    pairs, n, d = a.shape
    return a.reshape(batch, pairs // batch, n, d).transpose(0, 2, 1, 3)


def attention(q, k, v, scale: float):
    """softmax(q k^T * scale) v over (B, N, heads, head_dim), the softmax in float32; CPU form."""
    return _attention(q, k, v, float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
    """Without a gradient (sampling): large chunks."""
    return _attention_forward(q, k, v, scale, _SAMPLING_CHUNK_BYTES)[0]


def _attention_chunk(q, k, v, scale):
    """Forward over (pairs, N, d). The output is normalised after the product with v (N x d values
    rather than N x N probabilities), which saves a pass over the scores."""
    scores = jnp.einsum("pqd,pkd->pqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("pqk,pkd->pqd", unnormalised.astype(v.dtype), v).astype(jnp.float32) / total
    return out.astype(v.dtype), peak + jnp.log(total)


def _attention_forward(q, k, v, scale, chunk_bytes: int):
    qp, kp, vp = _pairs(q), _pairs(k), _pairs(v)
    out, logsumexp = _over_chunks(lambda *a: _attention_chunk(*a, scale), chunk_bytes, qp, kp, vp)
    return _unpairs(out, q.shape[0]), (qp, kp, vp, out, logsumexp)


def _attention_fwd(q, k, v, scale):
    """The forward pass of training (under a gradient): cache-sized chunks."""
    return _attention_forward(q, k, v, scale, _TRAINING_CHUNK_BYTES)


def _attention_chunk_bwd(q, k, v, out, logsumexp, d_out, scale):
    """Flash attention's backward pass (Dao et al. 2022, sec. 3.1) over (pairs, N, d): the
    probabilities are recomputed as exp(scores - logsumexp), keys first (rows are keys), so that
    dv and dk contract over the contiguous axis."""
    scale_ = jnp.asarray(scale, q.dtype)
    probs_t = jnp.exp(jnp.einsum("pkd,pqd->pkq", k, q * scale_).astype(jnp.float32)
                      - logsumexp.transpose(0, 2, 1))
    dv = jnp.einsum("pkq,pqd->pkd", probs_t.astype(d_out.dtype), d_out)
    rowdot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, None, :]
    dprobs_t = jnp.einsum("pkd,pqd->pkq", v, d_out).astype(jnp.float32)
    dscores_t = (probs_t * (dprobs_t - rowdot)).astype(q.dtype)
    # dq contracts over keys, the rows here: from the keys-first layout XLA:CPU runs it as a slow
    # generic product; transposed once in cache (the barrier keeps XLA from folding the transpose
    # back into the product) it is a plain one
    dscores = jax.lax.optimization_barrier(dscores_t.transpose(0, 2, 1))
    dq = jnp.einsum("pqk,pkd->pqd", dscores, k) * scale_
    dk = jnp.einsum("pkq,pqd->pkd", dscores_t, q) * scale_
    return dq, dk, dv


def _attention_bwd(scale, residuals, d_out):
    q, k, v, out, logsumexp = residuals
    d_pairs = _pairs(d_out)
    grads = _over_chunks(lambda *a: _attention_chunk_bwd(*a, scale), _TRAINING_CHUNK_BYTES,
                         _after(q, d_pairs), k, v, out, logsumexp, d_pairs)
    return tuple(_unpairs(g, d_out.shape[0]) for g in grads)


_attention.defvjp(_attention_fwd, _attention_bwd)
