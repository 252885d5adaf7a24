"""Class-conditional training and classifier-free guidance: the sampling program against PyTorch,
guidance's limits, train.py with labels end to end, sample.py and evaluate with labels, bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

import sample as sample_cli
from cli_runs import MICRO, cli_error, flags, run_cli
from flaxdiff import DiffusionPipeline
from flaxdiff.diffusers_io import load_unet
from flaxdiff.evaluate import main as evaluate_main
from flaxdiff.pipeline import ClassLabels
from flaxdiff.training.model_card import pytorch_class_sampling
from stand_in import nhwc
from torch_models import TINY, perturbed_unet

NAMES = ("circle", "square", "triangle", "cross")


@pytest.fixture(scope="module")
def conditional_folder(tmp_path_factory):
    """A class-conditional pipeline folder: a perturbed diffusers UNet with 4 classes + the null class.
    v-prediction: a random UNet's epsilon would be divided by sqrt(alphas_cumprod) ~ 0.006 at the
    first step, and trajectories of random weights amplify float rounding chaotically."""
    folder = tmp_path_factory.mktemp("conditional")
    perturbed_unet(dict(TINY, num_class_embeds=5), seed=3).save_pretrained(folder / "torch_unet")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                              timestep_spacing="trailing")
    pipe = DiffusionPipeline(load_unet(folder / "torch_unet"), scheduler.config, ClassLabels(NAMES, 4))
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_the_model_cards_pytorch_loop_samples_what_flaxdiff_samples(conditional_folder):
    """The PyTorch code train.py's model card shows, run as it is, against DiffusionPipeline with
    the same initial noise: labels, guidance 3, 50 DDIM steps (measured: 3.2e-6 per pixel at most)."""
    labels = [0, 3, 1, 2]
    namespace = {}
    exec(pytorch_class_sampling(str(conditional_folder), labels, 4, guidance=3.0), namespace)
    reference = nhwc(namespace["images"].numpy())
    latents = nhwc(namespace["torch"].randn(namespace["shape"], generator=torch.Generator().manual_seed(0)).numpy())
    pipe = DiffusionPipeline.from_pretrained(conditional_folder)
    assert pipe.class_labels == ClassLabels(NAMES, 4)
    ours = pipe(class_labels=[NAMES[i] for i in labels], guidance_scale=3.0, sampler="ddim", num_inference_steps=50,
                latents=latents)
    error = float(np.abs(ours - reference).max())
    print(f"\nguided DDIM, 50 steps, against the model card's PyTorch loop: largest pixel error {error:.1e}")
    assert error < 3e-5


def test_guidance_one_is_conditional_and_zero_is_the_null_class(conditional_folder):
    """In the guided program (one UNet call on the doubled batch per step), guidance 1 gives the
    plain conditional samples and guidance 0 the samples of the null class."""
    pipe = DiffusionPipeline.from_pretrained(conditional_folder)
    args = dict(sampler="ddpm", num_inference_steps=20, seed=4)
    conditional = pipe(class_labels=[0, 1, 2, 3], **args)
    null = DiffusionPipeline(pipe.unet, pipe.scheduler_config, ClassLabels(NAMES + ("null",)))(
        class_labels=[4, 4, 4, 4], **args)
    one = pipe(class_labels=[0, 1, 2, 3], guidance_scale=1.0, **args)
    zero = pipe(class_labels=[0, 1, 2, 3], guidance_scale=0.0, **args)
    three = pipe(class_labels=[0, 1, 2, 3], guidance_scale=3.0, **args)
    print(f"\nguidance 1 vs conditional {np.abs(one - conditional).max():.1e}, guidance 0 vs null class "
          f"{np.abs(zero - null).max():.1e}")
    assert np.abs(one - conditional).max() < 1e-5 and np.abs(zero - null).max() < 1e-5
    assert np.abs(three - conditional).max() > 1e-2
    assert np.abs(conditional[0] - pipe(class_labels=[1, 1, 2, 3], **args)[0]).max() > 1e-2  # labels matter


def test_pipeline_label_errors(conditional_folder):
    pipe = DiffusionPipeline.from_pretrained(conditional_folder)
    with pytest.raises(ValueError, match="is class-conditional: pass class_labels"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="unknown class 'hexagon'"):
        pipe(class_labels=["hexagon"], num_inference_steps=2)
    with pytest.raises(ValueError, match="class label 7 is out of range"):
        pipe(class_labels=[7], num_inference_steps=2)
    with pytest.raises(ValueError, match="2 class_labels for a batch of 3"):
        pipe(batch_size=3, class_labels=[0, 1], num_inference_steps=2)
    without_null = DiffusionPipeline(pipe.unet, pipe.scheduler_config, ClassLabels(NAMES))
    with pytest.raises(ValueError, match="needs a model trained with a null class"):
        without_null(class_labels=[0], guidance_scale=2.0, num_inference_steps=2)


# --------------------------------------------------------------------------- train.py with labels
@pytest.fixture(scope="module")
def conditional_run(micro_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conditional"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    process = run_cli(flags(micro_config, out, "--class_conditional", "--logger", "wandb", steps=8), env=env)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    return out, log


def test_conditional_run_saves_a_folder_diffusers_loads_with_its_classes(conditional_run):
    out, log = conditional_run
    assert "class-conditional: 4 classes (circle, square, triangle, cross), label 4 the null class" in log
    assert json.loads((out / "model_index.json").read_text())["_class_labels"] == {"names": list(NAMES),
                                                                                  "null_label": 4}
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.num_class_embeds == 5 and unet.class_embedding.weight.shape == (5, 64)
    card = (out / "README.md").read_text()
    assert "class_labels=torch.cat([labels, null])" in card and "guidance_scale=3.0" in card
    grid = Image.open(out / "samples.png")  # one row per class: 4 rows of 4 images of 16 px, 2 px gutters
    assert grid.size == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)


def test_its_wandb_offline_run_holds_the_metrics_and_the_grids(conditional_run):
    from cli_runs import training_rows
    from test_loggers import wandb_history
    out, _ = conditional_run
    run_files = list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history, rows = wandb_history(run_files[0]), training_rows(out)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    assert [round(h["train/loss"], 5) for h in history] == [round(r["loss"], 5) for r in rows]
    assert any(h.get("samples/_type") == "image-file" for h in history)


def test_sample_and_evaluate_with_labels(conditional_run, tmp_path, capsys):
    out, _ = conditional_run
    npz = tmp_path / "s.npz"
    assert sample_cli.main(["--model", str(out), "--num_images", "4", "--batch_size", "4", "--sampler", "ddim",
                            "--num_inference_steps", "3", "--class_labels", "cross,0", "--guidance_scale", "2",
                            "--save_npz", str(npz)]) == 0
    assert np.load(npz)["images"].shape == (4, 16, 16, 3)
    assert "classes circle, cross, guidance 2.0" in capsys.readouterr().out
    assert sample_cli.main(["--model", str(out), "--class_labels", "hexagon"]) == 2
    assert "unknown class 'hexagon'" in capsys.readouterr().err
    result = tmp_path / "bpd.json"
    assert evaluate_main(["--model", str(out), "--num_images", "8", "--num_timesteps", "2", "--batch_size", "8",
                          "--output_json", str(result)]) == 0
    assert 0 < json.loads(result.read_text())["bits_per_dim"] < 20


def test_label_problems_are_named(capsys, tmp_path, micro_config):
    folder = tmp_path / "no_classes"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), i * 30, np.uint8)).save(folder / f"{i}.png")
    base = ["--model_config_name_or_path", str(micro_config), "--resolution", "16", "--class_conditional"]
    assert "has no ClassLabel column" in cli_error(capsys, [*base, "--dataset", str(folder),
                                                            "--output_dir", str(tmp_path / "o1")])
    np.savez(tmp_path / "bad.npz", images=np.zeros((8, 16, 16, 3), np.uint8), labels=np.array([0, 1, 2, -1] * 2))
    assert "label -1 of image #3 is outside 0..2" in cli_error(capsys, [*base, "--dataset", str(tmp_path / "bad.npz"),
                                                                        "--output_dir", str(tmp_path / "o2")])
    config = tmp_path / "three.json"
    config.write_text(json.dumps({"_class_name": "UNet2DModel", **MICRO, "num_class_embeds": 3}))
    message = cli_error(capsys, ["--model_config_name_or_path", str(config), "--resolution", "16",
                                 "--class_conditional", "--output_dir", str(tmp_path / "o3")])
    assert "num_class_embeds 3, but the data has 4 classes" in message and "needs num_class_embeds 5" in message
    assert "add --class_conditional" in cli_error(capsys, ["--model_config_name_or_path", str(config),
                                                           "--resolution", "16", "--output_dir", str(tmp_path / "o4")])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_conditional_checkpoint_is_not_resumed_as_unconditional(capsys, conditional_run, micro_config, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(conditional_run[0], out)
    message = cli_error(capsys, flags(micro_config, out, "--resume_from_checkpoint", "latest", steps=8))
    assert "is of a class-conditional run and this run is not: resume with --class_conditional" in message


def test_conditional_demo_defaults_are_four_times_the_images(tmp_path):
    """--class_conditional on the built-in shapes defaults to batch 32 for 40 epochs (the budget at
    which the model follows its labels, docs/conditional.md); the unconditional demo, real datasets
    and the user's own flags keep theirs."""
    from flaxdiff.training import TrainOptions
    from flaxdiff.training.options import resolve_options

    def budget(**kwargs):
        opts = resolve_options(TrainOptions(output_dir=str(tmp_path / "o"), **kwargs))
        return opts.train_batch_size, opts.num_epochs

    assert budget(class_conditional=True) == (32, 40)
    assert budget() == (8, 10)
    assert budget(class_conditional=True, dataset=str(tmp_path)) == (16, 100)  # diffusers' defaults
    assert budget(class_conditional=True, train_batch_size=8) == (8, 40)
