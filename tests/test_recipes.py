"""python -m flaxdiff.recipes: a tiny sweep end to end, its results, and a resumed sweep."""

import json
import shutil

from cli_runs import MICRO  # noqa: F401  (the micro UNet of micro_config)
from flaxdiff import recipes


def sweep_args(micro_config, out):
    return ["--output_dir", str(out), "--grid", "learning_rate=1e-3,3e-4", "--images_seen", "128",
            "--validation_points", "2", "--", "--model_config_name_or_path", str(micro_config), "--resolution", "16",
            "--num_shapes", "64", "--train_batch_size", "8", "--validation_num_images", "8",
            "--validation_num_timesteps", "2", "--num_inference_steps", "2", "--eval_batch_size", "4",
            "--logging_steps", "4", "--lr_warmup_steps", "2"]


def test_a_tiny_sweep_end_to_end_and_resumed(micro_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert recipes.main(sweep_args(micro_config, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["recipe"] for r in results) == ["learning_rate=1e-3", "learning_rate=3e-4"]
    for r in results:
        assert r["images_seen"] == 128 and r["steps"] == 16
        assert [x for x, _ in r["curve"]] == [64, 128]  # validation every 8 steps, at equal images seen
        assert r["val_bpd_ema"] > 0 and r["best"] == min(r["val_bpd"], r["val_bpd_ema"])
        folder = out / r["recipe"]
        assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    assert results[0]["best"] <= results[1]["best"]  # ranked
    table = (out / "results.md").read_text()
    assert "| 1 | `learning_rate=" in table and (out / "bpd_vs_images.png").is_file()
    # interrupted: one recipe lost its end (pipeline and last log lines); the other is kept as it is
    kept = out / "learning_rate=1e-3"
    kept_metrics = (kept / "metrics.jsonl").read_text()
    broken = out / "learning_rate=3e-4"
    for name in ("model_index.json", "unet", "scheduler"):
        shutil.rmtree(broken / name) if (broken / name).is_dir() else (broken / name).unlink()
    shutil.rmtree(broken / "checkpoints" / "16")
    capsys.readouterr()
    assert recipes.main(sweep_args(micro_config, out)) == 0
    log = capsys.readouterr().out
    assert "recipe learning_rate=1e-3: done before, kept" in log
    assert (kept / "metrics.jsonl").read_text() == kept_metrics
    assert (broken / "model_index.json").is_file()
    again = {r["recipe"]: r for r in json.loads((out / "results.json").read_text())}
    assert again["learning_rate=3e-4"]["curve"][-1][0] == 128


def test_bad_grid_is_named(capsys, tmp_path):
    assert recipes.main(["--output_dir", str(tmp_path), "--grid", "lr=1", "--images_seen", "10"]) == 2
    assert "--grid 'lr=1': give a train.py flag" in capsys.readouterr().err
    assert recipes.main(["--output_dir", str(tmp_path), "--images_seen", "10", "--", "--dataset", str(tmp_path)]) == 2
    assert "pass -- --validation_split" in capsys.readouterr().err


def test_path_values_name_their_folder_by_the_last_part(tmp_path, capsys):
    """A grid over config folders makes one run folder per config, named after it; two configs whose
    folders share a name are an error, not one run overwriting the other."""
    configs = [tmp_path / "sizes" / name for name in ("small", "wide")]
    grid = recipes.parse_grid([f"model_config_name_or_path={configs[0]},{configs[1] / 'config.json'}"])
    names = [r.name for r in recipes.recipes(grid, [], tmp_path / "sweep", 64, 2)]
    assert names == ["model_config_name_or_path=small", "model_config_name_or_path=wide"]
    clash = f"model_config_name_or_path={tmp_path / 'a' / 'small'},{tmp_path / 'b' / 'small'}"
    assert recipes.main(["--output_dir", str(tmp_path / "s"), "--images_seen", "64", "--grid", clash]) == 2
    assert "two recipes would share a run folder (model_config_name_or_path=small)" in capsys.readouterr().err


def test_a_recipe_without_a_warmup_warms_up_for_a_tenth_of_its_run(tmp_path):
    """diffusers' default warmup (500 steps) is longer than a short sweep's runs: a recipe that sets
    none warms up for a tenth of its steps, which is the same share of images at every batch size;
    a long run keeps the default, and a warmup the user gives is kept as given."""
    grid = recipes.parse_grid(["train_batch_size=8,32"])
    base = ["--dataset", str(tmp_path), "--validation_split", "0.1"]
    short = recipes.recipes(grid, base, tmp_path / "sweep", 3200, 2)
    assert [(r.options.max_train_steps, r.options.lr_warmup_steps) for r in short] == [(400, 40), (100, 10)]
    long = recipes.recipes(grid, base, tmp_path / "sweep", 320_000, 2)
    assert [r.options.lr_warmup_steps for r in long] == [500, 500]
    given = recipes.recipes(grid, [*base, "--lr_warmup_steps", "7"], tmp_path / "sweep", 3200, 2)
    assert [r.options.lr_warmup_steps for r in given] == [7, 7]
