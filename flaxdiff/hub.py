"""Sharing a trained model: the model card train.py writes, and the upload to the Hugging Face Hub.

Only the diffusers pipeline and what its card shows go up (model_index.json, unet/, scheduler/,
README.md, samples.png, loss_curve.png, train_config.json); the Orbax checkpoints, the per-epoch
grids and the logs stay on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

TAGS = ("pytorch", "diffusers", "unconditional-image-generation", "diffusion-models-class", "jax", "flax")
UPLOADED = ("model_index.json", "unet/*", "scheduler/*", "README.md", "samples.png", "loss_curve.png",
            "train_config.json")


def default_repo_name(output_dir: str | Path) -> str:
    """diffusers' default --hub_model_id: the output folder's name."""
    return Path(output_dir).expanduser().resolve().name


def check_hub_access(repo_id: str) -> None:
    """Fail before training if an upload cannot work: a malformed repo id or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id ({error}); use 'name' or "
                         "'user/name' with letters, digits, '-', '_' and '.'") from error
    if get_token() is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` (or "
                         "`huggingface-cli login`) or set HF_TOKEN, then start again")


def model_card(meta: Mapping[str, Any], repo_id: str | None = None, final_loss: float | None = None) -> str:
    """The README.md of a trained pipeline folder: front matter with the tags, usage, how it was trained."""
    options, unet = meta["options"], meta["unet"]
    dataset = options["dataset"]
    name = repo_id or "path/to/this/folder"
    hub_dataset = dataset if ("/" in dataset and not Path(dataset).exists()) else None
    lines = ["---", "library_name: diffusers", "license: mit", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    if hub_dataset:
        lines += ["datasets:", f"- {hub_dataset}"]
    lines += ["---", "",
              "# Model Card for Unit 1 of the Diffusion Models Class 🧨", "",
              f"An unconditional image diffusion model (a diffusers `UNet2DModel` in a `DDPMPipeline`) trained "
              f"with [flaxdiff](https://github.com/flaxdiff/flaxdiff) in JAX on `{dataset}` at "
              f"{options['resolution']}x{options['resolution']} pixels.", "",
              "![samples](samples.png)", "",
              "## Usage", "",
              "With PyTorch diffusers:", "", "```python", "from diffusers import DDPMPipeline", "",
              f"pipeline = DDPMPipeline.from_pretrained('{name}')",
              "image = pipeline().images[0]", "image", "```", "",
              "With flaxdiff (JAX):", "", "```python", "from flaxdiff import DiffusionPipeline", "",
              f"pipeline = DiffusionPipeline.from_pretrained('{name}')",
              "images = pipeline(batch_size=4, num_inference_steps=50, sampler='ddim', seed=0)  # NHWC in [0, 1]",
              "```", "",
              "## Training", "",
              "| setting | value |", "| --- | --- |"]
    rows = [("dataset", f"`{dataset}` ({meta.get('num_images', '?')} images)"),
            ("UNet", f"block_out_channels {tuple(unet['block_out_channels'])}, "
                     f"{', '.join(unet['down_block_types'])}"),
            ("optimizer steps", meta.get("total_steps")),
            ("global batch", f"{options['train_batch_size']} x {options['gradient_accumulation_steps']} "
                             "accumulation"),
            ("learning rate", f"{options['learning_rate']} ({options['lr_scheduler']}, "
                              f"{options['lr_warmup_steps']} warmup steps)"),
            ("AdamW", f"betas ({options['adam_beta1']}, {options['adam_beta2']}), weight decay "
                      f"{options['adam_weight_decay']}, eps {options['adam_epsilon']}"),
            ("EMA", f"max decay {options['ema_max_decay']}" if options["use_ema"] else "no"),
            ("noise schedule", f"{options['ddpm_beta_schedule']}, {options['ddpm_num_steps']} steps, "
                               f"predicts {options['prediction_type']}"),
            ("precision", "bf16 compute" if options["mixed_precision"] == "bf16" else "float32"),
            ("seed", options["seed"])]
    if final_loss is not None:
        rows.append(("final training loss", f"{final_loss:.4f}"))
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "The loss curve:", "", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the repo (if needed) and upload the pipeline folder; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), allow_patterns=list(UPLOADED),
                      commit_message="Upload a DDPMPipeline trained with flaxdiff")
    return str(url)
