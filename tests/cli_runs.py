"""Running train.py as a user does, in a subprocess, on a micro UNet and the built-in shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

STEPS = 32  # 64 images / batch 8 = 8 steps per epoch: 4 epochs
def cli_error(capsys, args) -> str:
    """train.py's one `error:` line for bad flags or data (exit code 2, no traceback)."""
    import train as train_cli

    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def metrics_rows(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def training_rows(run) -> list[dict]:
    """The rows of metrics.jsonl that a training window wrote (validation rows have no loss)."""
    return [r for r in metrics_rows(run) if "loss" in r]


def validation_rows(run) -> list[dict]:
    return [r for r in metrics_rows(run) if "val_bpd" in r]


VALIDATION = ("--validation_split", "test", "--validation_steps", "16", "--validation_num_images", "16",
              "--validation_num_timesteps", "4")
MICRO = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def write_micro_config(folder: Path) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps({"_class_name": "UNet2DModel", **MICRO}))
    return path


def flags(config: Path, output_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--model_config_name_or_path", str(config), "--resolution", "16", "--num_shapes", "64",
            "--train_batch_size", "8", "--eval_batch_size", "4", "--ddpm_num_inference_steps", "4",
            "--logging_steps", "4", "--checkpointing_steps", "8", "--save_images_epochs", "2",
            "--save_model_epochs", "100", "--lr_warmup_steps", "5", "--learning_rate", "1e-3", "--use_ema",
            "--random_flip", "--max_train_steps", str(steps), "--output_dir", str(output_dir), *extra]


def run_cli(args, devices: int = 2, env: dict | None = None) -> subprocess.Popen:
    """train.py in a new process with `devices` simulated CPU devices; output in .stdout.
    `env`: the environment to start from (default: this process's)."""
    env = {**(os.environ if env is None else env), "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
