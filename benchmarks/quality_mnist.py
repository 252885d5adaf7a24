"""Does flaxdiff train as well as diffusers? The same small UNet, hyperparameters and number of steps,
trained on real MNIST digits by flaxdiff's train.py and by a faithful transcription of diffusers'
train_unconditional.py loop in PyTorch; both scored on 1,000 held-out digits in bits/dim.

    python benchmarks/quality_mnist.py                     # 3 seeds a side: ~3 hours on 2 CPU cores
    python benchmarks/quality_mnist.py --steps 200 --seeds 0  # a smoke run

The data is ../shared/data/mnist_t10k.npz (the MNIST test set): the first 9,000 digits train, the
last 1,000 are held out. The PyTorch model is saved as a diffusers DDPMPipeline folder and loaded
by flaxdiff through that folder, so both are evaluated by the same code (flaxdiff.evaluate: the
DDPM variational bound, Monte-Carlo over timesteps, the same timesteps and noise for both models,
so the paired difference has a smaller standard error than either). Results: a markdown table on
stdout, benchmarks/results/quality_mnist.json and the sample grids in docs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# small enough that both sides train 25,600 digits in ~15 minutes each on 2 CPU cores
UNET = dict(_class_name="UNet2DModel", sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=[32, 64, 64], norm_num_groups=16, attention_head_dim=8,
            down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])


def hyperparameters(args) -> dict:
    return dict(train_batch_size=args.batch_size, max_train_steps=args.steps, learning_rate=args.learning_rate,
                lr_scheduler="cosine", lr_warmup_steps=args.warmup, adam_beta1=0.95, adam_beta2=0.999,
                adam_weight_decay=1e-6, adam_epsilon=1e-8, max_grad_norm=1.0, use_ema=True, ema_inv_gamma=1.0,
                ema_power=0.75, ema_max_decay=0.9999, ddpm_num_steps=1000, ddpm_beta_schedule="linear",
                prediction_type="epsilon", seed=args.seed)


def train_flaxdiff(train_npz: Path, config_json: Path, out: Path, hp: dict) -> float:
    from flaxdiff.training import TrainOptions, train

    opts = TrainOptions(dataset=str(train_npz), model_config_name_or_path=str(config_json), resolution=28,
                        center_crop=True, random_flip=False, output_dir=str(out), overwrite_output_dir=True,
                        save_images_epochs=10_000, save_model_epochs=10_000, checkpointing_steps=10_000,
                        eval_batch_size=16, sampler="ddim", num_inference_steps=50, logging_steps=50, **hp)
    start = time.perf_counter()
    train(opts)
    return time.perf_counter() - start


def train_diffusers(images: np.ndarray, config_json: Path, out: Path, hp: dict) -> float:
    """train_unconditional.py's loop (accelerate removed: one process, no accumulation, fp32)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    torch.manual_seed(hp["seed"])
    model = UNet2DModel.from_config(json.loads(config_json.read_text()))
    ema_model = EMAModel(model.parameters(), decay=hp["ema_max_decay"], use_ema_warmup=True,
                         inv_gamma=hp["ema_inv_gamma"], power=hp["ema_power"], model_cls=UNet2DModel,
                         model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=hp["ddpm_num_steps"], beta_schedule=hp["ddpm_beta_schedule"],
                                    prediction_type=hp["prediction_type"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"],
                                  betas=(hp["adam_beta1"], hp["adam_beta2"]), weight_decay=hp["adam_weight_decay"],
                                  eps=hp["adam_epsilon"])
    # transforms: Resize(28) + CenterCrop(28) are the identity on 28x28 digits; ToTensor + Normalize([0.5], [0.5])
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=hp["train_batch_size"],
                                         shuffle=True, drop_last=True)
    lr_scheduler = get_scheduler(hp["lr_scheduler"], optimizer=optimizer, num_warmup_steps=hp["lr_warmup_steps"],
                                 num_training_steps=hp["max_train_steps"])
    step, bar = 0, tqdm(total=hp["max_train_steps"], desc="diffusers", unit="step")
    start = time.perf_counter()
    while step < hp["max_train_steps"]:
        model.train()
        for (clean_images,) in loader:
            noise = torch.randn(clean_images.shape)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean_images),)).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema_model.step(model.parameters())
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step == hp["max_train_steps"]:
                break
    bar.close()
    seconds = time.perf_counter() - start
    ema_model.copy_to(model.parameters())
    DDPMPipeline(unet=model, scheduler=noise_scheduler).save_pretrained(out)
    return seconds


def seed_statistics(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over seeds (nan for one seed)."""
    mean = float(np.mean(values))
    error = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return mean, error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist_t10k.npz"))
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps for each (default 800)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2", help="the seeds each side trains with (default 0,1,2): the "
                        "seed-to-seed spread is what tells a real difference from chance")
    parser.add_argument("--num_timesteps", type=int, default=50, help="Monte-Carlo timesteps per held-out image")
    parser.add_argument("--work_dir", default=str(HERE / "results" / "quality_mnist"))
    parser.add_argument("--only", choices=("flaxdiff", "diffusers"), help="train only one side (then evaluate both "
                        "that exist)")
    parser.add_argument("--evaluate_only", action="store_true", help="train nothing: score the runs that exist")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found: pass --data with the MNIST .npz (uint8 images (N, 28, 28, 1))",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    digits = np.load(args.data)["images"]
    train_images, held_out = digits[:9000], digits[9000:]
    np.savez(work / "train.npz", images=train_images)
    config_json = work / "unet_config.json"
    config_json.write_text(json.dumps(UNET))
    results_file = HERE / "results" / "quality_mnist.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    args.seed = seeds[0]
    results.update(hyperparameters={k: v for k, v in hyperparameters(args).items() if k != "seed"}, unet=UNET,
                   train_images=len(train_images), held_out_images=len(held_out), seeds=seeds)
    runs = results.setdefault("runs", {})

    sides = [args.only] if args.only else ["flaxdiff", "diffusers"]
    for seed in seeds:
        args.seed = seed
        hp = hyperparameters(args)
        for side in sides:
            out = work / f"seed{seed}" / side
            if args.evaluate_only or (out / "model_index.json").exists():
                continue  # resumable: a finished run is kept
            train = train_flaxdiff if side == "flaxdiff" else (
                lambda _npz, config, folder, hp: train_diffusers(train_images, config, folder, hp))
            seconds = train(work / "train.npz", config_json, out, hp)
            runs.setdefault(f"{side}/seed{seed}", {})["train_seconds"] = seconds
            results_file.write_text(json.dumps(results, indent=2) + "\n")

    from flaxdiff import DiffusionPipeline
    from flaxdiff.bound import pipeline_bits_per_dim
    from flaxdiff.images import image_grid

    per_image = {}
    for seed in seeds:
        for side in ("flaxdiff", "diffusers"):
            folder = work / f"seed{seed}" / side
            if not (folder / "model_index.json").exists():
                continue
            pipe = DiffusionPipeline.from_pretrained(folder)
            # the same timesteps and noise for every model (seed 1 of the bound), so differences pair up
            score = pipeline_bits_per_dim(pipe, held_out, num_timesteps=args.num_timesteps, batch_size=200, seed=1,
                                          progress=True)
            print(f"{side}, seed {seed}: {score}")
            per_image[(side, seed)] = score.per_image
            runs.setdefault(f"{side}/seed{seed}", {}).update(bits_per_dim=score.bits_per_dim,
                                                           standard_error=score.standard_error)
            if seed == seeds[0]:
                images = pipe(batch_size=64, num_inference_steps=100, sampler="ddim", seed=0)
                image_grid(images).resize((8 * 28 * 2, 8 * 28 * 2)).save(ROOT / "docs" / f"quality_mnist_{side}.png")
    summary = {}
    for side in ("flaxdiff", "diffusers"):
        values = [runs[f"{side}/seed{s}"]["bits_per_dim"] for s in seeds if (side, s) in per_image]
        if values:
            summary[side] = dict(zip(("mean", "seed_standard_error"), seed_statistics(values)), seeds=len(values))
    paired = [float((per_image[("flaxdiff", s)] - per_image[("diffusers", s)]).mean()) for s in seeds
              if ("flaxdiff", s) in per_image and ("diffusers", s) in per_image]
    if paired:
        mean, error = seed_statistics(paired)
        summary["gap"] = {"mean": mean, "seed_standard_error": error, "per_seed": paired}
    results["summary"] = summary
    results_file.parent.mkdir(exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(r: dict) -> str:
    hp, summary = r["hyperparameters"], r.get("summary", {})
    lines = [f"MNIST, {r['train_images']} training digits, {hp['max_train_steps']} steps of batch "
             f"{hp['train_batch_size']}, lr {hp['learning_rate']} cosine, EMA; held-out: {r['held_out_images']} "
             f"digits; seeds {', '.join(map(str, r['seeds']))} on each side",
             "", "| trained with | " + " | ".join(f"seed {s}" for s in r["seeds"]) + " | mean ± seed-to-seed s.e. |",
             "| --- | " + " | ".join("---" for _ in r["seeds"]) + " | --- |"]
    for side in ("flaxdiff", "diffusers"):
        if side in summary:
            cells = [f"{r['runs'].get(f'{side}/seed{s}', {}).get('bits_per_dim', float('nan')):.3f}" for s in r["seeds"]]
            lines.append(f"| {side} | " + " | ".join(cells) + f" | {summary[side]['mean']:.3f} ± "
                         f"{summary[side]['seed_standard_error']:.3f} |")
    if "gap" in summary:
        gap = summary["gap"]
        lines.append(f"\nflaxdiff - diffusers (held-out bits/dim, paired per seed over the same images and draws): "
                     f"{gap['mean']:+.4f} ± {gap['seed_standard_error']:.4f} (seed-to-seed standard error; per seed "
                     + ", ".join(f"{g:+.3f}" for g in gap["per_seed"]) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    sys.exit(main())
