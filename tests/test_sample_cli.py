"""sample.py and `python -m flaxdiff.evaluate` on a train.py output: every kind of model path, every
output, reproducibility, and clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

import sample as sample_cli
from cli_runs import validation_rows
from flaxdiff.evaluate import main as evaluate_main


def sample(tmp_path, model, *extra, name="a"):
    npz = tmp_path / f"{name}.npz"
    assert sample_cli.main(["--model", str(model), "--num_images", "6", "--batch_size", "4", "--sampler", "ddim",
                            "--num_inference_steps", "3", "--save_npz", str(npz), *extra]) == 0
    return np.load(npz)["images"]


def test_every_output_and_same_seed_same_images(finished_run, tmp_path):
    out, _ = finished_run
    images = sample(tmp_path, out, "--output", str(tmp_path / "grid.png"), "--output_dir", str(tmp_path / "pngs"))
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[5])), images[5])
    assert Image.open(tmp_path / "grid.png").size == (3 * 16 + 4, 2 * 16 + 2)
    np.testing.assert_array_equal(sample(tmp_path, out, name="b"), images)  # the same seed
    assert not np.array_equal(sample(tmp_path, out, "--seed", "1", name="c"), images)


def test_checkpoint_and_pipeline_folder_and_no_ema(finished_run, tmp_path):
    out, _ = finished_run
    from_folder = sample(tmp_path, out, name="folder")
    # the last checkpoint's EMA weights are the weights the pipeline folder holds
    np.testing.assert_array_equal(sample(tmp_path, out / "checkpoints" / "32", name="ckpt"), from_folder)
    training_weights = sample(tmp_path, out / "checkpoints" / "32", "--no_ema", name="raw")
    assert not np.array_equal(training_weights, from_folder)


@pytest.mark.parametrize("args, expected", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--num_images", "0"], "--num_images must be at least 1"),
    (["--batch_size", "6"], "divisible by the 4 devices"),
    (["--output", "/no/such/dir/grid.png"], "does not exist"),
])
def test_clear_errors(finished_run, capsys, args, expected):
    argv = ["--model", str(finished_run[0]), *args] if args[0] != "--model" else args
    assert sample_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_not_a_model_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert sample_cli.main(["--model", str(tmp_path)]) == 2
    assert "not a model" in capsys.readouterr().err.lower()


def test_evaluate_cli(finished_run, tmp_path, capsys):
    out, _ = finished_run
    result = tmp_path / "bpd.json"
    argv = ["--model", str(out), "--dataset", "shapes", "--num_images", "8", "--num_timesteps", "4",
            "--batch_size", "8", "--output_json", str(result)]
    assert evaluate_main(argv) == 0
    first = json.loads(result.read_text())
    assert first["num_images"] == 8 and first["num_timesteps"] == 4 and 0 < first["bits_per_dim"] < 20
    assert "bits/dim" in capsys.readouterr().out
    assert evaluate_main(argv) == 0
    assert json.loads(result.read_text()) == first  # a function of --seed


def test_validation_during_training_is_what_evaluate_says(finished_run, tmp_path):
    """The held-out bits/dim train.py logged at its last step (--validation_split test, 16 images, 4
    timesteps each) is what python -m flaxdiff.evaluate gives for the same weights and draws: the
    EMA from the pipeline folder, the training weights from the last checkpoint."""
    out, log = finished_run
    validations = validation_rows(out)
    assert [r["step"] for r in validations] == [16, 32] and "validation: 16 images (split 'test')" in log
    results = {}
    for name, model, extra in (("ema", out, []), ("raw", out / "checkpoints" / "32", ["--no_ema"])):
        result = tmp_path / f"{name}.json"
        assert evaluate_main(["--model", str(model), "--dataset", "shapes", "--split", "test", "--num_images", "16",
                              "--num_timesteps", "4", "--output_json", str(result), *extra]) == 0
        results[name] = json.loads(result.read_text())["bits_per_dim"]
    print(f"\nvalidation at step 32: {validations[-1]['val_bpd_ema']:.6f} (EMA), {validations[-1]['val_bpd']:.6f}; "
          f"evaluate: {results['ema']:.6f}, {results['raw']:.6f}")
    assert abs(validations[-1]["val_bpd_ema"] - results["ema"]) < 1e-5
    assert abs(validations[-1]["val_bpd"] - results["raw"]) < 1e-5
    assert validations[-1]["val_bpd_ema"] != validations[-1]["val_bpd"]


@pytest.mark.parametrize("args, expected", [
    (["--model", "/no/such/model"], "/no/such/model does not exist"),
    (["--num_images", "0"], "--num_images must be at least 1"),
    (["--dataset", "./no/such/folder"], "the image folder ./no/such/folder does not exist"),
    (["--split", "validation"], "the built-in 'shapes' dataset has the splits 'train' and 'test'"),
])
def test_evaluate_clear_errors(finished_run, capsys, args, expected):
    argv = ["--model", str(finished_run[0]), *args] if args[0] != "--model" else args
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
