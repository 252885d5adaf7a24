# %% [markdown]
# # Introduction to flaxdiff
#
# Unit 1's first notebook ("Introduction to 🤗 Diffusers"), in JAX with flaxdiff: load a dataset,
# look at the noise schedule, build the course's UNet, train it with a short loop written here from
# flaxdiff's pieces, sample with DDPM and DDIM, save a diffusers pipeline folder and load it back.
#
# Run it on a Colab or Kaggle TPU for the full recipe. On a CPU, `QUICK` makes every step short
# (a few minutes in all) while still training for real.

# %%
import os
import socket
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import flaxdiff
from flaxdiff import DiffusionPipeline, NoiseSchedule, UNet2D, add_noise
from flaxdiff.data import DataError, DataSpec, load_images
from flaxdiff.images import image_grid

ACCELERATOR = jax.default_backend() in ("tpu", "gpu")
QUICK = os.environ.get("QUICK", "0" if ACCELERATOR else "1") == "1"  # the size knob
print(f"flaxdiff {flaxdiff.__version__}, JAX {jax.__version__}: {jax.device_count()} {jax.default_backend()} "
      f"device(s); QUICK = {QUICK}")
if not ACCELERATOR:
    print("note: no TPU or GPU here, so QUICK is on: a small UNet and a short run. On Colab/Kaggle choose a TPU "
          "runtime (or set QUICK=0) for the course's recipe.")

# %% [markdown]
# ## The dataset
# The course trains on 1,000 Smithsonian butterflies from the Hugging Face Hub. Without Hub access
# we use flaxdiff's built-in dataset of coloured shapes instead. Images are decoded, resized to
# 32x32 and kept as one uint8 array.

# %%
RESOLUTION = 32


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


images, dataset = None, "smithsonian_butterflies"
if hub_reachable():
    try:
        images = load_images(DataSpec(dataset=dataset, resolution=RESOLUTION, center_crop=True))
    except DataError as error:
        print(f"note: {error}")
if images is None:
    dataset = "shapes"
    print("note: the Hugging Face Hub is not reachable from here: using flaxdiff's built-in shapes dataset")
    images = load_images(DataSpec(dataset=dataset, resolution=RESOLUTION, num_shapes=1024 if QUICK else 4096))
print(f"{len(images)} images of {images.shape[1:]} from '{dataset}'")
plt.figure(figsize=(8, 2))
plt.imshow(image_grid(images[:8], columns=8))
plt.axis("off")
plt.show()

# %% [markdown]
# ## The noise schedule
# DDPM adds Gaussian noise over 1,000 timesteps: `x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`.
# `NoiseSchedule` takes the same config as diffusers' `DDPMScheduler` and gives the same arrays.

# %%
scheduler_config = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
schedule = NoiseSchedule.from_config(scheduler_config)
alphas_cumprod = np.asarray(schedule.alphas_cumprod)
plt.figure(figsize=(5, 3))
plt.plot(np.sqrt(alphas_cumprod), label=r"$\sqrt{\bar\alpha_t}$")
plt.plot(np.sqrt(1 - alphas_cumprod), label=r"$\sqrt{1 - \bar\alpha_t}$")
plt.xlabel("timestep t")
plt.legend()
plt.show()

x0 = jnp.asarray(images[:8], jnp.float32) / 127.5 - 1  # [-1, 1], NHWC
timesteps = jnp.linspace(0, 999, 8).astype(jnp.int32)
noisy = add_noise(schedule, x0, jax.random.normal(jax.random.key(0), x0.shape), timesteps)
plt.figure(figsize=(8, 2))
plt.imshow(image_grid(np.asarray(noisy) / 2 + 0.5, columns=8))
plt.title("t = " + ", ".join(str(int(t)) for t in timesteps))
plt.axis("off")
plt.show()

# %% [markdown]
# ## The UNet
# The course's `UNet2DModel` config, as a Flax NNX module with diffusers' architecture (NHWC).
# With `QUICK` (no accelerator) we train a smaller UNet of the same design.

# %%
COURSE = dict(sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(64, 128, 128, 256),
              down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
SMALL = dict(COURSE, layers_per_block=1, block_out_channels=(16, 32, 64, 64), norm_num_groups=8)


def count(module) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


print(f"the course UNet: {count(UNet2D(COURSE, rngs=nnx.Rngs(0))) / 1e6:.1f}M parameters")
unet_config = SMALL if QUICK else COURSE
unet = UNet2D(unet_config, rngs=nnx.Rngs(0))
print(f"training a UNet with {count(unet) / 1e6:.2f}M parameters")

# %% [markdown]
# ## Training, written out
# The DDPM objective: pick a timestep, noise the images with `add_noise`, and regress the noise.
# The step is jitted over a mesh of all devices: the batch is sharded along "data", the weights
# replicated, and XLA inserts the gradient all-reduce (data parallelism). AdamW with diffusers'
# defaults, warmup then cosine decay. (`train.py` does all of this, plus EMA, checkpoints and more.)

# %%
BATCH = 16 if QUICK else 64
STEPS = 100 if QUICK else 4000
mesh = jax.make_mesh((jax.device_count(),), ("data",))
data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
if BATCH % jax.device_count():
    BATCH = jax.device_count() * max(1, BATCH // jax.device_count())
    print(f"note: batch rounded to {BATCH} so every device gets the same share")

learning_rate = optax.warmup_cosine_decay_schedule(0.0, 1e-3 if QUICK else 1e-4, STEPS // 10, STEPS)
optimizer = nnx.Optimizer(unet, optax.chain(optax.clip_by_global_norm(1.0),
                                            optax.adamw(learning_rate, b1=0.95, b2=0.999, eps=1e-8,
                                                        weight_decay=1e-6)), wrt=nnx.Param)
state = nnx.state((unet, optimizer))
nnx.update((unet, optimizer), jax.device_put(state, replicated))


@nnx.jit
def train_step(unet, optimizer, batch, key):
    t_key, noise_key = jax.random.split(key)
    x0 = batch.astype(jnp.float32) / 127.5 - 1
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(noise_key, x0.shape)
    noisy = add_noise(schedule, x0, noise, t)
    loss, grads = nnx.value_and_grad(lambda unet: jnp.mean((unet(noisy, t) - noise) ** 2))(unet)
    optimizer.update(unet, grads)
    return loss


rng = np.random.default_rng(0)
losses, start = [], time.perf_counter()
for step in range(STEPS):
    batch = jax.device_put(images[rng.integers(0, len(images), BATCH)], data_sharding)
    losses.append(train_step(unet, optimizer, batch, jax.random.fold_in(jax.random.key(1), step)))
losses = np.asarray(jax.device_get(losses))
print(f"{STEPS} steps of batch {BATCH} in {time.perf_counter() - start:.0f}s (with compilation); "
      f"loss {losses[:10].mean():.3f} -> {losses[-10:].mean():.3f}")
plt.figure(figsize=(5, 3))
plt.plot(losses)
plt.yscale("log")
plt.xlabel("step")
plt.ylabel("loss")
plt.show()

# %% [markdown]
# ## Sampling with DDPM and DDIM
# `DiffusionPipeline` wraps the UNet and a scheduler config; the sampler can change per call. Each
# call is one compiled program: the whole reverse process is a single `jax.lax.scan`.

# %%
pipe = DiffusionPipeline(unet, {**scheduler_config, "_class_name": "DDPMScheduler"})
ddpm_steps = 100 if QUICK else 1000
ddpm = pipe(batch_size=8, num_inference_steps=ddpm_steps, sampler="ddpm", seed=0)
ddim = pipe(batch_size=8, num_inference_steps=50, sampler="ddim", seed=0)
fig, axes = plt.subplots(2, 1, figsize=(8, 2.8))
for ax, result, title in ((axes[0], ddpm, f"DDPM, {ddpm_steps} steps"), (axes[1], ddim, "DDIM, 50 steps")):
    ax.imshow(image_grid(result, columns=8))
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Saving as a diffusers pipeline, and loading it back
# The folder is exactly what PyTorch `diffusers.DDPMPipeline.from_pretrained` loads (and what
# `push_to_hub` would upload).

# %%
folder = "my-flaxdiff-pipeline"
pipe.save_pretrained(folder)
print(sorted(os.listdir(folder)))
again = DiffusionPipeline.from_pretrained(folder)
same = again(batch_size=8, num_inference_steps=50, sampler="ddim", seed=0)
print("loaded back; the same seed gives the same images:", bool(np.array_equal(same, ddim)))

# %% [markdown]
# ## The one-line equivalents
# Everything above, with EMA, exact resume, checkpoints, sample grids and a model card:
#
# ```bash
# python train.py --dataset smithsonian_butterflies --output_dir butterflies-32 --use_ema
# python sample.py --model butterflies-32 --sampler ddim --num_images 16
# ```
#
# and any diffusers `DDPMPipeline` on the Hub or on disk samples in JAX:
#
# ```python
# pipe = DiffusionPipeline.from_pretrained("google/ddpm-cifar10-32")
# images = pipe(batch_size=4, num_inference_steps=50, sampler="ddim", seed=0)
# ```
