"""The model card (README.md) of a trained pipeline folder: Hub front matter, usage with PyTorch
diffusers and with flaxdiff, and how the model was trained."""

from __future__ import annotations

from pathlib import Path

from .run_folder import RunRecord

TAGS = ("pytorch", "diffusers", "unconditional-image-generation", "diffusion-models-class", "jax", "flax")


def model_card(record: RunRecord, repo_id: str | None = None, final_loss: float | None = None,
               validation: dict | None = None) -> str:
    """The README.md of a trained pipeline folder: front matter with the tags, usage, how it was trained."""
    options, unet = record.options, record.unet
    dataset = options.dataset
    name = repo_id or "path/to/this/folder"
    hub_dataset = dataset if ("/" in dataset and not Path(dataset).exists()) else None
    lines = ["---", "library_name: diffusers", "license: mit", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    if hub_dataset:
        lines += ["datasets:", f"- {hub_dataset}"]
    base = options.pretrained_model_name_or_path
    if base and "/" in base and not Path(base).exists():
        lines.append(f"base_model: {base}")
    kind = "A class-conditional" if record.class_names else "An unconditional"
    tuned = (f" fine-tuned from `{options.pretrained_model_name_or_path}`" if options.pretrained_model_name_or_path
             else "")
    lines += ["---", "",
              "# Model Card for Unit 1 of the Diffusion Models Class 🧨", "",
              f"{kind} image diffusion model (a diffusers `UNet2DModel` in a `DDPMPipeline`){tuned}, trained "
              f"with [flaxdiff](https://github.com/flaxdiff/flaxdiff) in JAX on `{dataset}` at "
              f"{options.resolution}x{options.resolution} pixels.", "",
              "![samples](samples.png)", "", "## Usage", ""]
    lines += class_usage(record, name) if record.class_names else unconditional_usage(name)
    lines += ["## Training", "",
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
    if options.pretrained_model_name_or_path:
        rows.insert(0, ("fine-tuned from", f"`{options.pretrained_model_name_or_path}`"))
    if record.class_names:
        rows.append(("classes", f"{len(record.class_names)}: " + ", ".join(
            f"{i} {n}" for i, n in enumerate(record.class_names[:20])) + (" ..." if len(record.class_names) > 20
                                                                          else "")))
        rows.append(("class dropout", f"{options.class_dropout_prob} (null label {record.null_label})"
                     if record.null_label is not None else "none (no guidance)"))
    if final_loss is not None:
        rows.append(("final training loss", f"{final_loss:.4f}"))
    if validation:
        held = f"held-out bits/dim ({options.validation_split}, {options.validation_num_timesteps} timesteps per image)"
        rows.append((held, ", ".join(f"{value:.4f} ({'EMA' if key.endswith('ema') else 'training weights'})"
                                     for key, value in validation.items())))
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "The loss curve:", "", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def unconditional_usage(name: str) -> list[str]:
    return ["With PyTorch diffusers:", "", "```python", "from diffusers import DDPMPipeline", "",
            f"pipeline = DDPMPipeline.from_pretrained('{name}')",
            "image = pipeline().images[0]", "image", "```", "",
            "With flaxdiff (JAX):", "", "```python", "from flaxdiff import DiffusionPipeline", "",
            f"pipeline = DiffusionPipeline.from_pretrained('{name}')",
            "images = pipeline(batch_size=4, num_inference_steps=50, sampler='ddim', seed=0)  # NHWC in [0, 1]",
            "```", ""]


def pytorch_class_sampling(name: str, labels: list[int], null_label: int | None, guidance: float = 3.0,
                           steps: int = 50) -> str:
    """A PyTorch loop that samples a class-conditional folder with labels (and classifier-free
    guidance when it has a null class): diffusers' DDPMPipeline takes no labels. The test suite runs
    this very code against flaxdiff's samples."""
    lines = ["import torch",
             "from diffusers import DDIMScheduler, UNet2DModel", "",
             f"unet = UNet2DModel.from_pretrained('{name}', subfolder='unet')",
             f"scheduler = DDIMScheduler.from_pretrained('{name}', subfolder='scheduler')",
             f"labels = torch.tensor({labels})"]
    if null_label is not None:
        lines += [f"null = torch.full_like(labels, {null_label})  # the null class",
                  f"guidance = {guidance}  # 1: plain conditional, 0: unconditional"]
    lines += ["size = unet.config.sample_size",
              "shape = (len(labels), unet.config.in_channels, size, size)",
              "x = torch.randn(shape, generator=torch.Generator().manual_seed(0))",
              f"scheduler.set_timesteps({steps})",
              "with torch.no_grad():",
              "    for t in scheduler.timesteps:"]
    if null_label is not None:
        lines += ["        both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample",
                  "        cond, uncond = both.chunk(2)",
                  "        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample"]
    else:
        lines += ["        x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample"]
    lines += ["images = (x / 2 + 0.5).clamp(0, 1)  # NCHW in [0, 1]"]
    return "\n".join(lines)


def class_usage(record: RunRecord, name: str) -> list[str]:
    names, null = record.class_names, record.null_label
    labels = list(range(min(len(names), 4)))
    guidance = ", guidance_scale=3.0" if null is not None else ""
    return ["With PyTorch diffusers (the labels go to the UNet; " + ", ".join(
                f"{i} is {n}" for i, n in enumerate(names[:4])) + "):", "",
            "```python", pytorch_class_sampling(name, labels, null), "```", "",
            "With flaxdiff (JAX), by number or by name:", "", "```python", "from flaxdiff import DiffusionPipeline", "",
            f"pipeline = DiffusionPipeline.from_pretrained('{name}')",
            f"images = pipeline(class_labels={[names[i] for i in labels]}{guidance}, sampler='ddim', seed=0)",
            "```", ""]
