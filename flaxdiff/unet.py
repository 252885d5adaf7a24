"""UNet2D in Flax NNX with exactly the architecture of diffusers' `UNet2DModel`, NHWC.

Configured by the keys of a diffusers UNet `config.json` (`UNet2DConfig`). Attribute names mirror
the diffusers module tree (`down_blocks.0.resnets.1.conv1`, `mid_block.attentions.0.to_q`, ...),
so the key map to diffusers' state dict is mechanical (see `diffusers_io`). Parameters are
float32; `dtype` sets the compute dtype (e.g. bfloat16) with normalisation statistics and the
attention softmax kept in float32. Initialisation follows PyTorch's defaults (uniform in
±1/sqrt(fan_in) for weights and biases), so training from scratch starts where diffusers does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import ops
from .compat import ModuleList

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
DIFFUSERS_VERSION = "0.42.1"


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The diffusers `UNet2DModel` config keys we implement, with diffusers' defaults."""

    sample_size: int | tuple | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    # value checks: option -> allowed values (None means "must be None": not implemented)
    _CHOICES = {
        "time_embedding_type": ("positional",),
        "mid_block_type": ("UNetMidBlock2D", None),
        "downsample_type": ("conv",),
        "upsample_type": ("conv",),
        "act_fn": tuple(ACTIVATIONS),
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "class_embed_type": (None, "timestep", "identity"),
    }

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for name, allowed in self._CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"UNet2DModel config {name}={getattr(self, name)!r} is not supported by "
                                 f"flaxdiff: use one of {', '.join(map(repr, allowed))}")
        for name, allowed, types in (("down_block_types", DOWN_BLOCKS, self.down_block_types),
                                     ("up_block_types", UP_BLOCKS, self.up_block_types)):
            for block in types:
                if block not in allowed:
                    raise ValueError(f"UNet2DModel config {name} contains {block!r}, which flaxdiff does not "
                                     f"support: use {', '.join(map(repr, allowed))}")
        if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels) >= 1):
            raise ValueError("UNet2DModel config: down_block_types, up_block_types and block_out_channels must "
                             f"have the same length, got {len(self.down_block_types)}, "
                             f"{len(self.up_block_types)}, {len(self.block_out_channels)}")
        groups = self.norm_num_groups
        for channels in self.block_out_channels:
            if not isinstance(groups, int) or channels % groups:
                raise ValueError(f"UNet2DModel config: norm_num_groups={groups} must divide every entry of "
                                 f"block_out_channels {self.block_out_channels}")
        if self.layers_per_block < 1:
            raise ValueError(f"UNet2DModel config: layers_per_block must be >= 1, got {self.layers_per_block}")
        classes = self.num_class_embeds
        if classes is not None and (not isinstance(classes, int) or classes < 1):
            raise ValueError(f"UNet2DModel config: num_class_embeds must be a positive integer, got {classes}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "UNet2DConfig":
        """From a diffusers UNet2DModel config (keys starting with "_" are metadata and ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"UNet2DModel config keys not supported by flaxdiff: {', '.join(unknown)}")
        return cls(**config)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "UNet2DConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        config = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            config[field.name] = list(value) if isinstance(value, tuple) else value
        return config

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.sample_size is None:
            return None
        if isinstance(self.sample_size, int):
            return (self.sample_size, self.sample_size)
        return tuple(self.sample_size)

    @property
    def class_conditional(self) -> bool:
        """Whether the UNet takes class labels (diffusers: a class_embedding module exists)."""
        return self.class_embed_type is not None or self.num_class_embeds is not None

    @property
    def downsampling_factor(self) -> int:
        """Height and width must be multiples of this (each down block but the last halves them)."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------- layers
def _torch_uniform_init(fan_in: int):
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Drawn with numpy from the bits of the JAX key: the same key gives the same weights, and
    building a UNet takes well under a second (JAX's threefry would compile one kernel per
    parameter shape, tens of seconds for a UNet on a CPU).
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):  # under jit / eval_shape: stay in JAX
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        values = np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)
        return jnp.asarray(values, dtype)
    return init


def linear(din: int, dout: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    init = _torch_uniform_init(din)
    return nnx.Linear(din, dout, kernel_init=init, bias_init=init, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs)


class Conv(nnx.Conv):
    """nnx.Conv, except that on CPUs a convolution over an image of at most 2x2 pixels is computed
    by `ops.small_image_conv` (XLA:CPU's own form of it is many times slower)."""

    def __call__(self, x):
        if ops.is_small_image_conv(x.shape, self.kernel_size):
            return ops.small_image_conv(x.astype(self.dtype), self.kernel[...], self.bias[...], self.padding,
                                        self.strides)
        return super().__call__(x)


def conv(din: int, dout: int, kernel: int, rngs: nnx.Rngs, dtype, stride: int = 1, padding: int = 1) -> Conv:
    init = _torch_uniform_init(din * kernel * kernel)
    return Conv(din, dout, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                    kernel_init=init, bias_init=init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC: statistics over (H, W, C/G) per group, biased variance, in float32.
    `norm(x, act)` applies an activation after it (fused on CPUs, see `ops.group_norm`)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        self.num_groups, self.eps = num_groups, eps
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x, act=None):
        return ops.group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps, act)


def _dropout(x, rate: float, key):
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (pre-norm, time embedding added or as scale/shift)."""

    def __init__(self, in_channels, out_channels, temb_channels, config: UNet2DConfig, *, index: int,
                 output_scale_factor: float = 1.0, rngs: nnx.Rngs, dtype):
        groups, eps = config.norm_num_groups, config.norm_eps
        self.act = ACTIVATIONS[config.act_fn]
        self.scale_shift = config.resnet_time_scale_shift == "scale_shift"
        self.dropout_rate, self.index, self.output_scale_factor = config.dropout, index, output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = conv(in_channels, out_channels, 3, rngs, dtype)
        self.time_emb_proj = linear(temb_channels, out_channels * (2 if self.scale_shift else 1), rngs, dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = conv(out_channels, out_channels, 3, rngs, dtype)
        self.conv_shortcut = (conv(in_channels, out_channels, 1, rngs, dtype, padding=0)
                              if in_channels != out_channels else None)

    def __call__(self, x, temb, dropout_key=None):
        h = self.conv1(self.norm1(x, self.act))
        temb = self.time_emb_proj(self.act(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = self.act(self.norm2(h) * (1 + scale) + shift)
        else:
            h = self.norm2(h + temb, self.act)
        if dropout_key is not None:
            h = _dropout(h, self.dropout_rate, jax.random.fold_in(dropout_key, self.index))
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


def _attention(q, k, v, scale: float):
    """softmax(q k^T * scale) v over (B, N, heads, head_dim), softmax in float32.

    Accelerators: jax.nn.dot_product_attention (cuDNN / fused kernels where available). CPUs:
    `ops.attention`, the same math as batched matmuls with a memory-saving backward pass.
    """
    if not ops.use_cpu_kernels():
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    return ops.attention(q, k, v, scale)


class Attention(nnx.Module):
    """diffusers Attention as used by the UNet2D blocks: group norm, self-attention, residual."""

    def __init__(self, channels, head_dim: int | None, norm_groups: int | None, eps: float, *,
                 rescale_output_factor: float = 1.0, rngs: nnx.Rngs, dtype):
        head_dim = head_dim if head_dim is not None else channels
        self.heads, self.head_dim = channels // head_dim, head_dim
        inner = self.heads * head_dim
        if self.heads < 1:
            raise ValueError(f"attention_head_dim={head_dim} is larger than the {channels} channels it attends over")
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_groups, channels, eps) if norm_groups is not None else None
        self.to_q = linear(channels, inner, rngs, dtype)
        self.to_k = linear(channels, inner, rngs, dtype)
        self.to_v = linear(channels, inner, rngs, dtype)
        self.to_out = ModuleList([linear(inner, channels, rngs, dtype)])

    def __call__(self, x):
        b, h, w, c = x.shape
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        x = x.reshape(b, h * w, c)
        q, k, v = (proj(x).reshape(b, h * w, self.heads, self.head_dim) for proj in (self.to_q, self.to_k, self.to_v))
        out = _attention(q, k, v, self.head_dim**-0.5)
        out = self.to_out[0](out.reshape(b, h * w, self.heads * self.head_dim)).reshape(b, h, w, c)
        return (out + residual) / self.rescale_output_factor


class Downsample2D(nnx.Module):
    """3x3 convolution, stride 2; diffusers pads the right and bottom only when padding is 0."""

    def __init__(self, channels, padding: int, *, rngs, dtype):
        self.padding, self.dtype = padding, dtype
        self.conv = conv(channels, channels, 3, rngs, dtype, stride=2, padding=padding)

    def __call__(self, x):
        return ops.downsample_conv(x.astype(self.dtype), self.conv.kernel[...], self.conv.bias[...], self.padding)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (computed at the low resolution,
    see `ops.upsample_conv`)."""

    def __init__(self, channels, *, rngs, dtype):
        self.dtype = dtype
        self.conv = conv(channels, channels, 3, rngs, dtype)

    def __call__(self, x):
        return ops.upsample_conv(x.astype(self.dtype), self.conv.kernel[...], self.conv.bias[...])


class _Counter:
    """Hands out a distinct index per resnet, so each draws its own dropout mask from one key."""

    def __init__(self):
        self.value = 0

    def __call__(self):
        self.value += 1
        return self.value


class DownBlock(nnx.Module):
    """DownBlock2D / AttnDownBlock2D."""

    def __init__(self, in_channels, out_channels, temb_channels, config: UNet2DConfig, *, attention: bool,
                 add_downsample: bool, counter: _Counter, rngs, dtype):
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, config,
                          index=counter(), rngs=rngs, dtype=dtype)
            for i in range(config.layers_per_block)])
        self.attentions = ModuleList([
            Attention(out_channels, config.attention_head_dim, config.norm_num_groups, config.norm_eps,
                      rngs=rngs, dtype=dtype)
            for _ in range(config.layers_per_block)]) if attention else None
        self.downsamplers = (ModuleList([Downsample2D(out_channels, config.downsample_padding, rngs=rngs, dtype=dtype)])
                             if add_downsample else None)

    def __call__(self, x, temb, dropout_key=None):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, dropout_key)
            if self.attentions is not None:
                x = self.attentions[i](x)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock(nnx.Module):
    """UpBlock2D / AttnUpBlock2D: layers_per_block + 1 resnets, each fed one skip connection."""

    def __init__(self, in_channels, prev_output_channels, out_channels, temb_channels, config: UNet2DConfig, *,
                 attention: bool, add_upsample: bool, counter: _Counter, rngs, dtype):
        num_layers = config.layers_per_block + 1
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, config,
                                         index=counter(), rngs=rngs, dtype=dtype))
        self.resnets = ModuleList(resnets)
        self.attentions = ModuleList([
            Attention(out_channels, config.attention_head_dim, config.norm_num_groups, config.norm_eps,
                      rngs=rngs, dtype=dtype)
            for _ in range(num_layers)]) if attention else None
        self.upsamplers = ModuleList([Upsample2D(out_channels, rngs=rngs, dtype=dtype)]) if add_upsample else None

    def __call__(self, x, skips, temb, dropout_key=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb, dropout_key)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, channels, temb_channels, config: UNet2DConfig, *, counter: _Counter, rngs, dtype):
        scale = config.mid_block_scale_factor
        if config.attn_norm_num_groups is not None:
            attn_groups = config.attn_norm_num_groups
        else:  # diffusers: the mid attention has no group norm under scale_shift
            attn_groups = config.norm_num_groups if config.resnet_time_scale_shift == "default" else None
        self.resnets = ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, config, index=counter(), output_scale_factor=scale,
                          rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = ModuleList([
            Attention(channels, config.attention_head_dim, attn_groups, config.norm_eps,
                      rescale_output_factor=scale, rngs=rngs, dtype=dtype)]) if config.add_attention else None

    def __call__(self, x, temb, dropout_key=None):
        x = self.resnets[0](x, temb, dropout_key)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb, dropout_key)


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels, time_embed_dim, *, rngs, dtype):
        self.linear_1 = linear(in_channels, time_embed_dim, rngs, dtype)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, rngs, dtype)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000):
    """Sinusoidal timestep features (Vaswani et al. 2017), diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class UNet2D(nnx.Module):
    """The diffusers UNet2DModel. `unet(x, timesteps)`: x NHWC, timesteps scalar or (B,) -> NHWC."""

    def __init__(self, config: UNet2DConfig | Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                 dtype=jnp.float32, gradient_checkpointing: bool = False):
        if not isinstance(config, UNet2DConfig):
            config = UNet2DConfig.from_dict(config)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing
        channels = config.block_out_channels
        temb = config.time_embed_dim
        counter = _Counter()
        self.conv_in = conv(config.in_channels, channels[0], 3, rngs, dtype)
        self.time_embedding = TimestepEmbedding(channels[0], temb, rngs=rngs, dtype=dtype)
        down, out_ch = [], channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            down.append(DownBlock(in_ch, out_ch, temb, config, attention=block_type == "AttnDownBlock2D",
                                  add_downsample=i < len(channels) - 1, counter=counter, rngs=rngs, dtype=dtype))
        self.down_blocks = ModuleList(down)
        self.mid_block = (UNetMidBlock2D(channels[-1], temb, config, counter=counter, rngs=rngs, dtype=dtype)
                          if config.mid_block_type is not None else None)
        up, reversed_ch = [], list(reversed(channels))
        out_ch = reversed_ch[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, reversed_ch[i]
            in_ch = reversed_ch[min(i + 1, len(channels) - 1)]
            up.append(UpBlock(in_ch, prev_ch, out_ch, temb, config, attention=block_type == "AttnUpBlock2D",
                              add_upsample=i < len(channels) - 1, counter=counter, rngs=rngs, dtype=dtype))
        self.up_blocks = ModuleList(up)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = conv(channels[0], config.out_channels, 3, rngs, dtype)
        # diffusers' UNet2DModel: a table of num_class_embeds rows, or the timestep MLP applied to the
        # sinusoidal features of the label, or (identity) labels that are embeddings already
        if config.class_embed_type is None and config.num_class_embeds is not None:
            self.class_embedding = nnx.Embed(config.num_class_embeds, temb, dtype=dtype, param_dtype=jnp.float32,
                                             embedding_init=nnx.initializers.normal(1.0), rngs=rngs)  # torch's N(0, 1)
        elif config.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(channels[0], temb, rngs=rngs, dtype=dtype)
        else:
            self.class_embedding = None

    def _class_embedding(self, class_labels, batch: int):
        """The class term added to the time embedding, as diffusers computes it."""
        config = self.config
        if class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels (one integer label per image)")
        labels = jnp.asarray(class_labels)
        if config.class_embed_type == "identity":
            return jnp.broadcast_to(labels, (batch, labels.shape[-1])).astype(self.dtype)
        labels = jnp.broadcast_to(labels, (batch,))
        if config.class_embed_type == "timestep":
            features = timestep_embedding(labels, config.block_out_channels[0], config.flip_sin_to_cos,
                                          config.freq_shift).astype(self.dtype)
            return self.class_embedding(features)
        return self.class_embedding(labels.astype(jnp.int32)).astype(self.dtype)

    def _call_block(self, block, *args):
        if self.gradient_checkpointing:
            return nnx.remat(lambda blk, *a: blk(*a))(block, *args)
        return block(*args)

    def __call__(self, sample, timesteps, *, class_labels=None, dropout_key=None):
        """sample (B, H, W, in_channels); timesteps scalar or (B,); class_labels (B,) ints for a
        class-conditional UNet (float (B, time_embed_dim) embeddings for class_embed_type identity);
        dropout_key enables dropout."""
        config = self.config
        batch, height, width, channels = sample.shape
        if channels != config.in_channels:
            raise ValueError(f"the UNet takes {config.in_channels} channels (NHWC), got input of shape {sample.shape}")
        factor = config.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this UNet "
                             f"({len(config.block_out_channels)} blocks), got {height}x{width}")
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos,
                                   config.freq_shift).astype(self.dtype)
        emb = self.time_embedding(t_emb)
        if config.class_conditional:
            emb = emb + self._class_embedding(class_labels, batch)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this UNet is unconditional (its config has no num_class_embeds "
                             "or class_embed_type)")
        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, outputs = self._call_block(block, x, emb, dropout_key)
            skips.extend(outputs)
        if self.mid_block is not None:
            x = self._call_block(self.mid_block, x, emb, dropout_key)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            x = self._call_block(block, x, block_skips, emb, dropout_key)
        x = self.conv_out(self.conv_norm_out(x, jax.nn.silu))
        return x.astype(jnp.float32)
