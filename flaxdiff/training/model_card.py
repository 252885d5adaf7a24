"""The model card (README.md) of a trained pipeline folder: Hub front matter, usage with PyTorch
diffusers and with flaxdiff, and how the model was trained."""

from __future__ import annotations

from pathlib import Path

from .run_folder import RunRecord

TAGS = ("pytorch", "diffusers", "unconditional-image-generation", "diffusion-models-class", "jax", "flax")


def model_card(record: RunRecord, repo_id: str | None = None, final_loss: float | None = None) -> str:
    """The README.md of a trained pipeline folder: front matter with the tags, usage, how it was trained."""
    options, unet = record.options, record.unet
    dataset = options.dataset
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
              f"{options.resolution}x{options.resolution} pixels.", "",
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
    rows = [("dataset", f"`{dataset}` ({record.num_images} images)"),
            ("UNet", f"block_out_channels {tuple(unet['block_out_channels'])}, "
                     f"{', '.join(unet['down_block_types'])}"),
            ("optimizer steps", record.total_steps),
            ("global batch", f"{options.train_batch_size} x {options.gradient_accumulation_steps} "
                             "accumulation"),
            ("learning rate", f"{options.learning_rate} ({options.lr_scheduler}, "
                              f"{options.lr_warmup_steps} warmup steps)"),
            ("AdamW", f"betas ({options.adam_beta1}, {options.adam_beta2}), weight decay "
                      f"{options.adam_weight_decay}, eps {options.adam_epsilon}"),
            ("EMA", f"max decay {options.ema_max_decay}" if options.use_ema else "no"),
            ("noise schedule", f"{options.ddpm_beta_schedule}, {options.ddpm_num_steps} steps, "
                               f"predicts {options.prediction_type}"),
            ("precision", "bf16 compute" if options.mixed_precision == "bf16" else "float32"),
            ("seed", options.seed)]
    if final_loss is not None:
        rows.append(("final training loss", f"{final_loss:.4f}"))
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "The loss curve:", "", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)
