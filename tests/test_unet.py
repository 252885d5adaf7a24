"""The Flax UNet2D against diffusers' UNet2DModel, and the safetensors round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxdiff.compat import variable_value
from flaxdiff.diffusers_io import load_unet, save_unet, unet_state_dict
from flaxdiff.unet import UNet2D, UNet2DConfig
from torch_models import CONFIGS, TINY, perturbed_unet, with_legacy_attention_names

TIMESTEPS = [0, 1, 50, 500, 999]


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
    """Each test config as a perturbed diffusers UNet2DModel, saved with save_pretrained."""
    out = {}
    for name, config in CONFIGS.items():
        model = perturbed_unet(config)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


_forward = nnx.jit(lambda model, x, t: model(x, t))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers(saved_unets, name):
    torch_unet, folder = saved_unets[name]
    unet = load_unet(folder)  # through the files, without torch
    config = torch_unet.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, config.sample_size, config.sample_size, config.in_channels)).astype(np.float32)
    worst = 0.0
    for t in TIMESTEPS:
        with torch.no_grad():
            ref = torch_unet(torch.tensor(x.transpose(0, 3, 1, 2)), t).sample.numpy().transpose(0, 2, 3, 1)
        out = np.asarray(_forward(unet, jnp.asarray(x), jnp.asarray(t)))
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    # per-example timesteps, as the training step calls it
    ts = np.array([3, 777])
    with torch.no_grad():
        ref = torch_unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(ts)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(_forward(unet, jnp.asarray(x), jnp.asarray(ts)))
    worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    print(f"\n{name}: largest relative forward error {worst:.2e}")
    assert worst < 2e-5  # measured 1.3e-6 to 2.3e-6 (jax 0.10.2, torch 2.13 CPU): ~10x


# class-conditional UNets: diffusers' three class_embed_types
CLASS_CONFIGS = {"table": dict(TINY, num_class_embeds=5), "timestep": dict(TINY, class_embed_type="timestep"),
                 "identity": dict(TINY, class_embed_type="identity", num_class_embeds=None),
                 "table_scale_shift": dict(TINY, num_class_embeds=11, resnet_time_scale_shift="scale_shift",
                                           flip_sin_to_cos=False, freq_shift=1)}


@pytest.mark.parametrize("name", list(CLASS_CONFIGS))
def test_class_conditional_forward_matches_diffusers(name, tmp_path):
    """UNet2DModel(x, t, class_labels=...) with every weight perturbed, through the saved folder both
    ways (a bitwise round trip); measured 1e-6 relative at most."""
    torch_unet = perturbed_unet(CLASS_CONFIGS[name], seed=4)
    torch_unet.save_pretrained(tmp_path / "in")
    unet = load_unet(tmp_path / "in")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    t = np.array([0, 400, 999])
    if name == "identity":
        labels = rng.standard_normal((3, unet.config.time_embed_dim)).astype(np.float32)
    else:
        labels = np.array([0, 3, 4]) if name != "timestep" else np.array([0, 7, 1000])
    with torch.no_grad():
        ref = torch_unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t),
                         class_labels=torch.tensor(labels)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(nnx.jit(lambda m, x, t, y: m(x, t, class_labels=y))(unet, jnp.asarray(x), jnp.asarray(t),
                                                                        jnp.asarray(labels)))
    error = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"\nclass-conditional {name}: largest relative forward error {error:.2e}")
    assert error < 2e-5  # ~10x the measured error, as the unconditional configs
    # another label gives another output (the class term is really used)
    other = unet(jnp.asarray(x), jnp.asarray(t), class_labels=jnp.asarray(labels[::-1].copy()))
    assert float(np.abs(np.asarray(other) - out).max()) > 1e-3
    save_unet(unet, tmp_path / "out")
    original = load_file(str(tmp_path / "in" / "diffusion_pytorch_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert original.keys() == written.keys() and all(original[k].tobytes() == written[k].tobytes() for k in original)
    assert UNet2DModel.from_pretrained(tmp_path / "out").config.class_embed_type == CLASS_CONFIGS[name].get(
        "class_embed_type")


def test_class_labels_are_checked():
    conditional = UNet2D(CLASS_CONFIGS["table"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="is class-conditional: pass class_labels"):
        conditional(jnp.zeros((1, 16, 16, 3)), 0)
    with pytest.raises(ValueError, match="this UNet is unconditional"):
        UNet2D(TINY, rngs=nnx.Rngs(0))(jnp.zeros((1, 16, 16, 3)), 0, class_labels=jnp.array([1]))


def test_unet_compiles_once_per_input_shape():
    unet = UNet2D(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(unet)
    forward = jax.jit(lambda state, x, t: nnx.merge(graphdef, state)(x, t))
    for t in (0, 10, 999):
        forward(state, jnp.zeros((2, 16, 16, 3)), jnp.asarray(t))
    forward(state, jnp.ones((2, 16, 16, 3)), jnp.array([1, 2]))
    assert forward._cache_size() == 2  # scalar vs (B,) timesteps
    forward(state, jnp.zeros((4, 16, 16, 3)), jnp.asarray(5))
    assert forward._cache_size() == 3


def test_save_pretrained_loads_in_diffusers_bitwise(tmp_path):
    unet = UNet2D(TINY, rngs=nnx.Rngs(3))
    save_unet(unet, tmp_path / "unet")
    torch_unet = UNet2DModel.from_pretrained(tmp_path / "unet")
    ours = unet_state_dict(unet)
    theirs = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def test_round_trip_is_exact(saved_unets, tmp_path):
    _, folder = saved_unets["cifar10"]
    unet = load_unet(folder)
    save_unet(unet, tmp_path)
    original, written = load_file(str(folder / "diffusion_pytorch_model.safetensors")), \
        load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert set(original) == set(written)
    for name in original:
        assert original[name].tobytes() == written[name].tobytes(), name
    assert UNet2DConfig.from_json_file(tmp_path / "config.json") == unet.config


def test_deprecated_attention_names_load(saved_unets, tmp_path):
    """Checkpoints from before diffusers 0.14 (google/ddpm-*) name attention query/key/value/proj_attn."""
    torch_unet, folder = saved_unets["mnist"]
    renamed = with_legacy_attention_names(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    assert any(".proj_attn." in n for n in renamed)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = load_unet(folder), load_unet(tmp_path)
    for (pa, va), (pb, vb) in zip(nnx.state(a, nnx.Param).flat_state(), nnx.state(b, nnx.Param).flat_state()):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(variable_value(va)), np.asarray(variable_value(vb)))


def test_mismatched_weights_are_listed(saved_unets, tmp_path):
    _, folder = saved_unets["mnist"]
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    tensors.pop("conv_in.bias")
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["conv_out.weight"] = np.zeros((1, 32, 5, 5), np.float32)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError) as error:
        load_unet(tmp_path)
    message = str(error.value)
    assert "missing (1): conv_in.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "wrong shape (1): conv_out.weight: file (1, 32, 5, 5), model (1, 32, 3, 3)" in message


@pytest.mark.parametrize("change, match", [
    (dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]), "down_block_types contains 'CrossAttnDownBlock2D'"),
    (dict(time_embedding_type="fourier"), "time_embedding_type='fourier' is not supported"),
    (dict(act_fn="tanh"), "act_fn='tanh' is not supported"),
    (dict(class_embed_type="projection"), "class_embed_type='projection' is not supported"),
    (dict(num_class_embeds=0), "num_class_embeds must be a positive integer"),
    (dict(cross_attention_dim=768), "keys not supported by flaxdiff: cross_attention_dim"),
    (dict(norm_num_groups=24), "norm_num_groups=24 must divide"),
    (dict(up_block_types=["UpBlock2D"]), "same length"),
])
def test_unsupported_config_is_named(change, match):
    config = {**UNet2DConfig(**TINY).to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        UNet2DConfig.from_dict(config)


def test_bad_input_shape_is_named():
    unet = UNet2D(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="takes 3 channels"):
        unet(jnp.zeros((1, 3, 16, 16)), 0)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(jnp.zeros((1, 15, 15, 3)), 0)


def test_config_json_written_is_diffusers_config(tmp_path):
    unet = UNet2D(TINY, rngs=nnx.Rngs(0))
    save_unet(unet, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    torch_config = UNet2DModel.from_config(config).config
    for key, value in TINY.items():
        assert torch_config[key] == (list(value) if isinstance(value, tuple) else value) or \
            tuple(torch_config[key]) == value
