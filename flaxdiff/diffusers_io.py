"""diffusers folder <-> Flax UNet: config.json + diffusion_pytorch_model.safetensors, without torch.

The Flax module tree mirrors diffusers' names, so the key map is mechanical:
`<path>.kernel` is `<path>.weight` transposed (Conv (kh, kw, in, out) <-> (out, in, kh, kw); Linear
(in, out) <-> (out, in)), a GroupNorm's `scale` is its `weight`, biases are biases. Reading and
writing go through safetensors' numpy API, so a round trip is bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .compat import set_variable_value, variable_value
from .unet import UNet2D, UNet2DConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# attention parameter names of checkpoints saved before diffusers 0.14 (e.g. google/ddpm-cifar10-32)
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_name(path: tuple) -> str:
    *prefix, leaf = (str(p) for p in path)
    return ".".join(prefix + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    return value


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)
    return value


def unet_state_dict(model: UNet2D) -> dict[str, np.ndarray]:
    """The model's parameters under diffusers' names and layouts (numpy float32)."""
    params = nnx.state(model, nnx.Param)
    return {_diffusers_name(path): _to_torch_layout(str(path[-1]), np.asarray(variable_value(var)))
            for path, var in params.flat_state()}


def rename_deprecated_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0, as diffusers does when loading."""
    renamed = {}
    for name, value in state_dict.items():
        prefix, _, rest = name.rpartition(".")  # rest = weight | bias
        head, _, module = prefix.rpartition(".")
        if ".attentions." in f".{prefix}" and module in _DEPRECATED_ATTENTION_NAMES:
            name = f"{head}.{_DEPRECATED_ATTENTION_NAMES[module]}.{rest}"
        renamed[name] = value
    return renamed


def load_unet_state_dict(model: UNet2D, state_dict: Mapping[str, np.ndarray]) -> UNet2D:
    """Put diffusers-named tensors into the model (in place). Missing, unexpected or mis-shaped
    tensors raise one ValueError that lists them all."""
    state_dict = rename_deprecated_attention(state_dict)
    params = nnx.state(model, nnx.Param)
    expected = {_diffusers_name(path): (path, var) for path, var in params.flat_state()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = []
    new_values = []  # (variable, value), assigned only once everything fits
    for name, (path, var) in expected.items():
        if name not in state_dict:
            continue
        value = _from_torch_layout(str(path[-1]), np.asarray(state_dict[name]))
        if value.shape != tuple(var.shape):
            wrong_shape.append(f"{name}: file {tuple(np.asarray(state_dict[name]).shape)}, "
                               f"model {tuple(_to_torch_layout(str(path[-1]), np.empty(var.shape)).shape)}")
        new_values.append((var, value))
    if missing or unexpected or wrong_shape:
        lines = ["the weights do not fit this UNet config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        lines.append("Check that config.json belongs to these weights.")
        raise ValueError("\n".join(lines))
    for var, value in new_values:
        set_variable_value(var, jnp.asarray(value, dtype=jnp.float32))
    return model


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    try:
        if single.is_file():
            tensors = load_file(str(single))
        elif index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(str(folder / shard)))
        else:
            found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
            hint = (" (PyTorch .bin weights need conversion: load them with diffusers and save_pretrained "
                    "with safe_serialization=True)" if (folder / "diffusion_pytorch_model.bin").exists() else "")
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}; found: {found}{hint}")
    except SafetensorError as error:
        raise ValueError(f"cannot read the weights in {folder}: {error}") from error
    return {name: value.astype(np.float32) if value.dtype != np.float32 else value for name, value in tensors.items()}


def load_unet(folder: str | os.PathLike, dtype=jnp.float32, gradient_checkpointing: bool = False,
              config: UNet2DConfig | None = None) -> UNet2D:
    """A diffusers UNet2DModel folder (config.json + safetensors) as a Flax `UNet2D`; `config`
    replaces the folder's (the same weights with, e.g., another sample_size)."""
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a diffusers UNet2DModel folder")
    config = config or UNet2DConfig.from_json_file(config_file)
    state_dict = read_safetensors(folder)
    model = UNet2D(config, rngs=nnx.Rngs(0), dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    return load_unet_state_dict(model, state_dict)


def save_unet(model: UNet2D, folder: str | os.PathLike) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors that diffusers' UNet2DModel loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {name: np.asarray(value, np.float32) for name, value in unet_state_dict(model).items()}
    write_atomic(folder / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_NAME)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so readers never see half of it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
