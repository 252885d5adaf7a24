"""train.py end to end: outputs, exact resume after SIGKILL, diffusers loading, and bad input."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import train as train_cli
from cli_runs import STEPS, flags, metrics_rows, run_cli, training_rows, validation_rows
from flaxdiff import backend

def test_output_folder(finished_run):
    out, log = finished_run
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "metrics.jsonl", "loss_curve.png", "samples.png",
                 "train_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["16", "24", "32", "8"]
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["epoch_0000_step_000008.png", "epoch_0002_step_000024.png", "epoch_0003_step_000032.png"]
    rows = training_rows(out)
    validation = validation_rows(out)
    assert [r["step"] for r in rows] == list(range(4, STEPS + 1, 4))
    assert [r["step"] for r in validation] == [16, 32]  # --validation_steps 16
    for row in rows:
        assert {"step", "epoch", "loss", "lr", "images_per_sec", "grad_norm", "ema_decay"} <= set(row)
    assert all(r["images_per_sec"] > 0 for r in rows[1:])  # the first window holds the compile
    assert rows[-1]["epoch"] == 3
    assert "compiled and ran the first step" in log


def test_output_loads_in_pytorch_diffusers(finished_run):
    from diffusers import DDPMPipeline
    out, _ = finished_run
    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    from flaxdiff import DiffusionPipeline
    ours = DiffusionPipeline.from_pretrained(out)
    assert ours.scheduler_config["_class_name"] == "DDPMScheduler"


def test_scheduler_config_is_the_one_train_unconditional_saves(finished_run, tmp_path):
    """Every setting, and `_use_default_values` (the settings left at their defaults, which another
    scheduler built from the folder takes from its own defaults: DPM-Solver spaces its steps
    'linspace', not DDPM's 'leading'): for the built-in dataset's recipe (v-prediction, the cosine
    schedule, trailing spacing) as the run saved it, and for a real dataset's defaults (diffusers')."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from flaxdiff import DiffusionPipeline
    from flaxdiff.training import TrainOptions
    from flaxdiff.training.model import scheduler_config_for
    from flaxdiff.training.options import resolve_options

    def assert_same(ours, theirs):
        assert set(ours.pop("_use_default_values")) == set(theirs.pop("_use_default_values"))
        assert {k: v for k, v in ours.items() if not k.startswith("_")} == theirs

    ours = json.loads((finished_run[0] / "scheduler" / "scheduler_config.json").read_text())
    assert_same(ours, dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                         prediction_type="v_prediction", timestep_spacing="trailing").config))
    dpm = DPMSolverMultistepScheduler.from_pretrained(finished_run[0], subfolder="scheduler")
    assert DiffusionPipeline.from_pretrained(finished_run[0]).make_sampler("dpmsolver++").timestep_spacing == \
        dpm.config.timestep_spacing == "trailing"

    np.savez(tmp_path / "real.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    ours = scheduler_config_for(resolve_options(TrainOptions(dataset=str(tmp_path / "real.npz"))))
    assert DPMSolverMultistepScheduler.from_config(ours).config.timestep_spacing == "linspace"
    assert_same(ours, dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                         prediction_type="epsilon").config))


def test_sigkill_then_resume_equals_uninterrupted(finished_run, micro_config, tmp_path):
    """Kill -9 after the checkpoint of step 8 exists, resume with `latest`: the final weights and
    the logged losses are bit for bit those of the uninterrupted run.

    The uninterrupted and the killed run gather batches on the host (--dataset_on_device auto on
    CPU devices); the resumed run keeps the dataset in device memory and gathers each batch inside
    the train step. So this also checks that the device path trains on the same batches, bit for bit.
    """
    reference, reference_log = finished_run
    if not backend.forced():  # with the TPU/GPU paths the reference keeps the dataset on the devices too
        assert "on the host (CPU devices share host memory" in reference_log
    out = tmp_path / "killed"
    process = run_cli(flags(micro_config, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / "8").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_left = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_left and max(steps_left) < STEPS
    resumed = run_cli(flags(micro_config, out, "--resume_from_checkpoint", "latest", "--dataset_on_device", "yes"))
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert f"at step {max(steps_left)}" in log and "in device memory" in log
    assert_same_run(reference, out)


def assert_same_weights(reference, out):
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(reference / name)), load_file(str(out / name))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


def assert_same_run(reference, out):
    """Bit-for-bit the same final weights and the same logged losses."""
    assert_same_weights(reference, out)
    assert [r["loss"] for r in training_rows(reference)] == [r["loss"] for r in training_rows(out)]


def test_resume_from_an_explicit_checkpoint_path(finished_run, micro_config, tmp_path):
    """--resume_from_checkpoint <run>/checkpoints/16 in a new output_dir continues that run: the
    losses after step 16 and the final weights are bit for bit the uninterrupted run's."""
    reference, _ = finished_run
    out = tmp_path / "continued"
    process = run_cli(flags(micro_config, out, "--resume_from_checkpoint", str(reference / "checkpoints" / "16")))
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    assert f"resumed from {reference / 'checkpoints' / '16'} at step 16" in log
    assert_same_weights(reference, out)
    assert [r["step"] for r in training_rows(out)] == [20, 24, 28, 32]
    assert [r["loss"] for r in training_rows(out)] == [r["loss"] for r in training_rows(reference) if r["step"] > 16]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["24", "32"]


def test_checkpoints_total_limit_then_overwrite_output_dir(micro_config, tmp_path):
    """--checkpoints_total_limit 2 keeps the newest two; --overwrite_output_dir then removes what the
    first run wrote (checkpoints, grids, log, pipeline) and keeps the user's own file."""
    out = tmp_path / "run"
    first = run_cli(flags(micro_config, out, "--checkpoints_total_limit", "2"))
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["24", "32"]
    (out / "my_notes.md").write_text("keep me")
    (out / "samples" / "epoch_0099_step_000999.png").write_bytes(b"a grid of the old run")
    second = run_cli(flags(micro_config, out, "--overwrite_output_dir", "--checkpointing_steps", "16",
                           "--save_images_epochs", "100", steps=16))
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    assert (out / "my_notes.md").read_text() == "keep me"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["16"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0000_step_000008.png",
                                                                    "epoch_0001_step_000016.png"]
    steps = [row["step"] for row in metrics_rows(out)]
    assert steps == [4, 8, 12, 16]
    assert json.loads((out / "train_config.json").read_text())["total_steps"] == 16


def test_bf16_and_remat_run_saves_float32_and_says_what_the_step_needs(micro_config, tmp_path):
    """--mixed_precision bf16 --gradient_checkpointing: the pipeline and the checkpoint hold float32;
    the log starts with the doctor's line and says the step's memory against the device's."""
    out = tmp_path / "bf16"
    process = run_cli(flags(micro_config, out, "--mixed_precision", "bf16", "--gradient_checkpointing", steps=8),
                      env={**os.environ, "FLAXDIFF_DEVICE_MEMORY": "16GB"})
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    assert log.startswith("flaxdiff ") and "versions match" in log.splitlines()[0]
    assert "of 16.00 GB per device" in log and "the step needs" in log
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
    from flaxdiff.checkpoint import Checkpoints
    state = Checkpoints(out / "checkpoints", read_only=True).restore(8, None)
    floats = {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.dtype.kind == "f"}
    assert floats == {np.dtype(np.float32)}


def test_a_step_too_big_for_the_device_stops_with_both_figures(capsys, micro_config, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXDIFF_DEVICE_MEMORY", "3MB")  # a simulated device too small for the step
    message = cli_error(capsys, flags(micro_config, tmp_path / "o", steps=8))
    assert "the train step needs" in message and "per device but" in message and "3.0 MB" in message
    for hint in ("--train_batch_size 4 --gradient_accumulation_steps 2", "--gradient_checkpointing",
                 "--mixed_precision bf16"):
        assert hint in message, message


def test_second_run_reads_its_programs_from_the_default_compilation_cache(micro_config, tmp_path):
    """With no cache settings at all, train.py keeps its compiled programs in
    ~/.cache/flaxdiff/jax; a second run of the same job compiles nothing new (it writes no entry)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["HOME"] = str(tmp_path)
    cache = tmp_path / ".cache" / "flaxdiff" / "jax"
    entries = []
    for run in ("first", "second"):
        process = run_cli(flags(micro_config, tmp_path / run, steps=8), env=env)
        log, _ = process.communicate(timeout=600)
        assert process.returncode == 0, log
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert any(name.startswith("jit_steps-") for name in entries[0]), entries[0]  # the train step
    assert entries[1] == entries[0]


def test_half_written_checkpoint_is_never_resumed(finished_run, tmp_path):
    """An interrupted save leaves only Orbax's temporary directory, which `latest` ignores."""
    import shutil
    from flaxdiff.training.resume import find_checkpoint
    out = tmp_path / "run"
    shutil.copytree(finished_run[0] / "checkpoints", out / "checkpoints")
    shutil.copytree(out / "checkpoints" / "32", out / "checkpoints" / "40.orbax-checkpoint-tmp-1234")
    directory, step = find_checkpoint("latest", out)
    assert step == 32


# --------------------------------------------------------------------------- bad input
def cli_error(capsys, args) -> str:
    code = train_cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err  # one message (progress bars of data loading may precede it)
    assert "Traceback" not in err
    return errors[0]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--output_dir", "--resolution", "--center_crop", "--random_flip", "--train_batch_size",
                 "--eval_batch_size", "--num_epochs", "--max_train_steps", "--save_images_epochs",
                 "--save_model_epochs", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--adam_beta1",
                 "--adam_beta2", "--adam_weight_decay", "--adam_epsilon", "--use_ema", "--ema_inv_gamma",
                 "--ema_power", "--ema_max_decay", "--mixed_precision", "--prediction_type", "--ddpm_num_steps",
                 "--ddpm_num_inference_steps", "--num_inference_steps", "--ddpm_beta_schedule", "--checkpointing_steps",
                 "--checkpoints_total_limit", "--resume_from_checkpoint", "--seed", "--dataset", "--model_preset",
                 "--sampler", "--gradient_accumulation_steps", "--dataset_name", "--train_data_dir",
                 "--model_config_name_or_path", "--dataset_config_name", "--split", "--image_column"):
        assert flag in text, flag


def test_missing_and_empty_folder(capsys, tmp_path):
    assert "the image folder ./does/not/exist does not exist" in cli_error(
        capsys, ["--dataset", "./does/not/exist", "--output_dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in cli_error(capsys, ["--dataset", str(tmp_path / "empty"),
                                                   "--output_dir", str(tmp_path / "o2")])


def test_unreadable_image_named(capsys, tmp_path, micro_config):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 20, 3), i * 30, np.uint8)).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    message = cli_error(capsys, ["--dataset", str(images), "--output_dir", str(tmp_path / "o"),
                                 "--model_config_name_or_path", str(micro_config), "--resolution", "16"])
    assert "broken.jpg" in message and "Remove or replace" in message


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = cli_error(capsys, ["--dataset_name", "someone/some-dataset", "--output_dir", str(tmp_path / "o")])
    assert "cannot load the Hub dataset 'someone/some-dataset'" in message


def test_output_dir_problems(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert "is a file" in cli_error(capsys, ["--output_dir", str(a_file)])
    assert a_file.read_text() == "mine"
    assert "is not writable" in cli_error(capsys, ["--output_dir", "/proc/flaxdiff-output"])
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "notes.md").write_text("keep me")
    message = cli_error(capsys, ["--output_dir", str(users), "--overwrite_output_dir"])
    assert "not a flaxdiff run" in message
    assert (users / "notes.md").read_text() == "keep me"


def test_existing_run_needs_resume_or_overwrite(capsys, finished_run):
    message = cli_error(capsys, ["--output_dir", str(finished_run[0])])
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message


def test_checkpoint_of_another_model(capsys, finished_run, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    message = cli_error(capsys, ["--output_dir", str(out), "--resume_from_checkpoint", "latest",
                                 "--model_preset", "tiny", "--resolution", "16"])
    assert "is of another model config" in message and "block_out_channels" in message


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "shapes", "--train_data_dir", "./x"], "name different datasets"),
    (["--model_preset", "tiny", "--model_config_name_or_path", "x.json"], "not both"),
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "give only one"),
    (["--train_batch_size", "6"], "divisible by the 4 devices"),
    (["--resolution", "36"], "not a multiple of 8"),
    (["--ddpm_num_inference_steps", "2000"], "exceeds --ddpm_num_steps 1000"),
    (["--num_inference_steps", "10", "--ddpm_num_inference_steps", "20"], "differ: give only one"),
    (["--learning_rate", "-1"], "must be positive"),
    (["--max_train_steps", "0"], "at least 1"),
])
def test_contradicting_or_wrong_flags(capsys, tmp_path, args, expected):
    assert expected in cli_error(capsys, [*args, "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_docs_flag_table_is_the_options():
    """docs/training.md shows every flag with the help text train.py --help gives."""
    from pathlib import Path
    from conftest import ROOT
    from flaxdiff.training.options import markdown_flag_table
    page = (Path(ROOT) / "docs" / "training.md").read_text()
    assert markdown_flag_table() in page, "regenerate the tables of docs/training.md from markdown_flag_table()"


def test_a_warmup_longer_than_the_run_is_warned_about():
    """diffusers' default 500 warmup steps on a 400-step run: the learning rate never peaks."""
    from flaxdiff.training import TrainOptions
    from flaxdiff.training.setup import warmup_warning

    warning = warmup_warning(TrainOptions(lr_warmup_steps=500, learning_rate=1e-4), total_steps=400)
    assert warning.startswith("warning: --lr_warmup_steps 500") and "--lr_warmup_steps 40" in warning
    assert warmup_warning(TrainOptions(lr_warmup_steps=40), total_steps=400) is None
    assert warmup_warning(TrainOptions(lr_warmup_steps=500, lr_scheduler="constant"), total_steps=400) is None


def test_finished_run_has_no_warmup_warning(finished_run):
    assert "warning: --lr_warmup_steps" not in finished_run[1]
