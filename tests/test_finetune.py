"""Fine-tuning with --pretrained_model_name_or_path: the run starts from the pretrained weights bit
for bit, contradicting flags are errors naming both values, a short fine-tune moves the weights and
lowers the loss on the new images, and the configs of the original google/ddpm-* pipelines load."""

import json

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from cli_runs import MICRO, cli_error, flags, run_cli
from torch_models import with_legacy_attention_names
from flaxdiff.diffusers_io import unet_state_dict
from flaxdiff.training import TrainOptions
from flaxdiff.training.options import resolve_options
from flaxdiff.training.setup import prepare_run

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# the original google/ddpm-cifar10-32 folder's files (diffusers 0.1-era keys, pre-0.14 attention names)
CIFAR10_UNET = {"_class_name": "UNet2DModel", "_diffusers_version": "0.1.0", "act_fn": "silu",
                "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
                "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
                "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
                "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
GOOGLE_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.0", "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                    "trained_betas": None, "variance_type": "fixed_large"}
# google/ddpm-celebahq-256 and ddpm-bedroom-256: 6 levels, attention at 16x16
CELEBAHQ_UNET = {**CIFAR10_UNET, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
                 "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                      "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}


def google_folder(path, unet_config):
    """A pipeline folder as google/ddpm-* ship it: their configs, pre-0.14 attention names, random weights."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    model.save_pretrained(path / "unet")
    renamed = with_legacy_attention_names(load_file(str(path / WEIGHTS)))
    from safetensors.numpy import save_file
    save_file(renamed, str(path / WEIGHTS))
    (path / "unet" / "config.json").write_text(json.dumps(unet_config))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(GOOGLE_SCHEDULER))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": [
        "diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    return path


def flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def narrow(config: dict) -> dict:
    """The same architecture with a quarter of the channels (the full ones hold 36M and 114M weights)."""
    return {**config, "block_out_channels": [c // 4 for c in config["block_out_channels"]]}


@pytest.mark.parametrize("unet_config", [CIFAR10_UNET, CELEBAHQ_UNET], ids=["ddpm-cifar10-32", "ddpm-celebahq-256"])
def test_google_configs_are_read_as_they_are(tmp_path, unet_config):
    """Their exact files give the run's flags (no contradiction, nothing to pass but the folder)."""
    folder = tmp_path / "google"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(GOOGLE_SCHEDULER))
    opts = resolve_options(TrainOptions(pretrained_model_name_or_path=str(folder), output_dir=str(tmp_path / "o")))
    assert (opts.resolution, opts.num_channels, opts.ddpm_num_steps, opts.ddpm_beta_schedule, opts.prediction_type) \
        == (unet_config["sample_size"], 3, 1000, "linear", "epsilon")
    from flaxdiff.unet import UNet2DConfig
    assert UNet2DConfig.from_dict(unet_config).block_out_channels == tuple(unet_config["block_out_channels"])


@pytest.mark.parametrize("unet_config", [narrow(CIFAR10_UNET), narrow(CELEBAHQ_UNET)],
                         ids=["ddpm-cifar10-32", "ddpm-celebahq-256"])
def test_google_pipelines_start_from_their_weights_bit_for_bit(tmp_path, unet_config):
    """The run prepared from a google/ddpm-* folder (their architecture and files, narrower): its
    UNet config and scheduler config, its weights bit for bit in the training weights and in the
    EMA, a fresh optimizer."""
    folder = google_folder(tmp_path / "google", unet_config)
    opts = resolve_options(TrainOptions(pretrained_model_name_or_path=str(folder), output_dir=str(tmp_path / "out"),
                                        num_shapes=16, train_batch_size=4, max_train_steps=1))
    assert opts.resolution == unet_config["sample_size"] and opts.model_preset is None
    run = prepare_run(opts, log=lambda *a: None)
    assert run.model.config.block_out_channels == tuple(unet_config["block_out_channels"])
    assert run.record.scheduler["variance_type"] == "fixed_large"
    pretrained = {k.replace(".query.", ".to_q.").replace(".key.", ".to_k.").replace(".value.", ".to_v.")
                  .replace(".proj_attn.", ".to_out.0."): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    from flax import nnx
    unet = nnx.merge(run.model.graphdef, jax.tree.map(np.asarray, run.state.params))
    ours = unet_state_dict(unet)
    assert ours.keys() == pretrained.keys()
    assert all(ours[k].tobytes() == pretrained[k].tobytes() for k in ours)
    assert all(np.array_equal(a, b) for a, b in zip(flat(run.state.params).values(), flat(run.state.ema_params).values()))
    assert int(run.state.step) == 0
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert moments and all(not np.asarray(m).any() for m in moments)  # Adam's moments start at zero


@pytest.mark.parametrize("extra, expected", [
    (["--resolution", "32"], "--resolution 32 contradicts the pretrained model"),
    (["--prediction_type", "epsilon"], "--prediction_type epsilon contradicts the pretrained model"),
    (["--ddpm_num_steps", "500"], "which has 1000: drop --ddpm_num_steps"),
    (["--model_preset", "tiny"], "--pretrained_model_name_or_path and --model_preset each name the model"),
])
def test_flags_that_contradict_the_pretrained_model(capsys, finished_run, tmp_path, extra, expected):
    message = cli_error(capsys, ["--pretrained_model_name_or_path", str(finished_run[0]), *extra,
                                 "--output_dir", str(tmp_path / "o")])
    assert expected in message
    assert not (tmp_path / "o").exists()


def test_fine_tuning_moves_the_weights_and_lowers_the_loss_on_the_new_images(finished_run, micro_config, tmp_path):
    """From the micro run's pipeline, 16 steps on other images (dark stripes, not shapes): the weights
    move, the held-out bound on those images falls, and the card says where it started."""
    from flaxdiff import DiffusionPipeline, pipeline_bits_per_dim
    pretrained, _ = finished_run
    rng = np.random.default_rng(0)
    folder = tmp_path / "stripes"
    folder.mkdir()
    images = np.zeros((64, 16, 16, 3), np.uint8)
    for i in range(64):
        images[i, :, rng.integers(0, 12):][:, :4] = rng.integers(0, 256, 3)
        Image.fromarray(images[i]).save(folder / f"{i:02d}.png")
    out = tmp_path / "tuned"
    args = flags(micro_config, out, steps=16)
    for flag in ("--model_config_name_or_path", "--resolution"):  # the pretrained model says these
        index = args.index(flag)
        del args[index:index + 2]
    process = run_cli(["--pretrained_model_name_or_path", str(pretrained), "--dataset", str(folder),
                       "--center_crop", *args])
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    before, after = load_file(str(pretrained / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert max(float(np.abs(before[k] - after[k]).max()) for k in before) > 1e-4
    scores = [pipeline_bits_per_dim(DiffusionPipeline.from_pretrained(p), images[:32], num_timesteps=8, seed=3,
                                    batch_size=32) for p in (pretrained, out)]
    print(f"\nbits/dim on the new images: pretrained {scores[0]}, fine-tuned {scores[1]}")
    assert scores[1].bits_per_dim < scores[0].bits_per_dim
    card = (out / "README.md").read_text()
    assert f"fine-tuned from `{pretrained}`" in card
    assert json.loads((out / "train_config.json").read_text())["options"]["pretrained_model_name_or_path"] == \
        str(pretrained)
    assert MICRO["block_out_channels"] == tuple(json.loads((out / "unet" / "config.json").read_text())[
        "block_out_channels"])
