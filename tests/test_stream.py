"""--streaming: an image folder read as a stream, and a resume that continues the stream where the
checkpoint left it (the final weights bit for bit those of the uninterrupted run)."""

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from cli_runs import run_cli, training_rows

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream_images")
    rng = np.random.default_rng(0)
    for i in range(40):  # not a multiple of the batch: the stream wraps into the next epoch mid-batch
        image = np.zeros((20, 24, 3), np.uint8)
        image[:, rng.integers(0, 18):][:, :5] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


def stream_flags(micro_config, folder, out, *extra, buffer="0"):
    return ["--dataset", str(folder), "--streaming", "--shuffle_buffer_size", buffer, "--model_config_name_or_path",
            str(micro_config), "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "16",
            "--checkpointing_steps", "4", "--logging_steps", "4", "--num_inference_steps", "2", "--eval_batch_size",
            "4", "--save_model_epochs", "100", "--output_dir", str(out), *extra]


def finish(process):
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    return log


def test_resumed_stream_continues_the_uninterrupted_run(micro_config, folder, tmp_path):
    """Without a shuffle buffer, a resume from the checkpoint of step 8 (in the stream's second epoch)
    continues exactly: the final weights are the uninterrupted run's, bit for bit."""
    whole = tmp_path / "whole"
    log = finish(run_cli(stream_flags(micro_config, folder, whole)))
    assert "streamed (a shuffle buffer of 0 images)" in log
    resumed = tmp_path / "resumed"
    log = finish(run_cli(stream_flags(micro_config, folder, resumed, "--resume_from_checkpoint",
                                      str(whole / "checkpoints" / "8"))))
    assert "at step 8" in log
    a, b = load_file(str(whole / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_with_a_shuffle_buffer_a_resume_continues_from_the_saved_position(micro_config, folder, tmp_path):
    """With a shuffle buffer, a checkpoint keeps the stream's read position (not the buffer): the
    resumed run restores it and goes on, its later steps drawn in another order than the
    uninterrupted run's (as stream.py documents)."""
    import json

    from flaxdiff.checkpoint import Checkpoints
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finish(run_cli(stream_flags(micro_config, folder, whole, buffer="16")))
    meta = Checkpoints(whole / "checkpoints", read_only=True).read_meta(4)
    position = json.dumps(meta["stream"])
    assert meta["stream"]["epoch"] == 0 and '"shard_example_idx": 0' not in position  # 32 images read, and more
    log = finish(run_cli(stream_flags(micro_config, folder, resumed, "--resume_from_checkpoint",
                                      str(whole / "checkpoints" / "4"), buffer="16")))
    assert "at step 4" in log
    losses = {run: {row["step"]: row["loss"] for row in training_rows(run)}
              for run in (whole, resumed)}
    assert sorted(losses[resumed]) == [8, 12, 16]
    assert [losses[resumed][s] for s in (8, 12, 16)] != [losses[whole][s] for s in (8, 12, 16)]


def test_streaming_needs_max_train_steps(capsys, folder, tmp_path):
    import train as train_cli
    assert train_cli.main(["--dataset", str(folder), "--streaming", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--streaming needs --max_train_steps" in capsys.readouterr().err
