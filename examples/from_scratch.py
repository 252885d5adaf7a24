# %% [markdown]
# # Diffusion models from scratch, in JAX
#
# Unit 1's second notebook ("Diffusion Models from Scratch"), in JAX. Part 1 uses only JAX, Flax
# NNX and optax: the corruption process, a basic convolutional UNet, training it on MNIST digits
# and the simple iterative sampler. Part 2 does the same task with flaxdiff's pieces (the diffusers
# UNet2DModel architecture, the DDPM noise schedule, the epsilon loss and a DDIM sampler).
# It ends with an image of both results.
#
#     python examples/from_scratch.py            # QUICK on a CPU (a few minutes), the full recipe on a TPU/GPU
#     QUICK=0 python examples/from_scratch.py    # the full recipe anywhere
#
# notebooks/02_diffusion_models_from_scratch.ipynb is this file, cell for cell.

# %%
import os
import socket
import sys
import time
from pathlib import Path

import flaxdiff  # noqa: F401  (first: it sets its XLA:CPU flags where the installed jaxlib knows them)
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNGs; a notebook shows the figures
import matplotlib.pyplot as plt

ACCELERATOR = jax.default_backend() != "cpu"
QUICK = os.environ.get("QUICK", "0" if ACCELERATOR else "1") == "1"
print(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s); QUICK = {QUICK}"
      + ("" if ACCELERATOR else " (no accelerator: a short run that still trains; QUICK=0 for the full recipe)"))
OUTPUT = Path(os.environ.get("FROM_SCRATCH_OUTPUT", "from_scratch_results.png"))

# %% [markdown]
# ## The data: MNIST digits
# From the local copy of the MNIST test set if there is one, else from the Hugging Face Hub; with
# neither (offline, no file), simple generated shapes stand in, with a printed note.


# %%
def load_digits() -> tuple[np.ndarray, str]:
    """uint8 (N, 28, 28, 1) images and where they came from."""
    for path in (os.environ.get("MNIST_NPZ", ""), "../shared/data/mnist_t10k.npz", "../../shared/data/mnist_t10k.npz"):
        if path and Path(path).is_file():
            return np.load(path)["images"], f"MNIST from {path}"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()  # fail fast when offline
        from datasets import load_dataset

        dataset = load_dataset("ylecun/mnist", split="train")
        return np.stack([np.asarray(im) for im in dataset["image"]])[..., None], "MNIST from the Hub"
    except Exception as error:  # noqa: BLE001 -- any failure to reach the Hub means: use the fallback
        print(f"note: MNIST is not available here ({type(error).__name__}); training on generated shapes instead")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images = []
    for _ in range(4096):
        cy, cx, r = rng.uniform(9, 19, 2).tolist() + [rng.uniform(4, 9)]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        square = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        images.append(np.where(disc if rng.random() < 0.5 else square, 255, 0).astype(np.uint8))
    return np.stack(images)[..., None], "generated shapes"


digits, source = load_digits()
data = jnp.asarray(digits, jnp.float32) / 255.0  # [0, 1], NHWC, as the course's ToTensor()
print(f"{len(data)} images of {data.shape[1:]} ({source})")
plt.figure(figsize=(8, 1))
plt.imshow(np.concatenate(list(digits[:8, ..., 0]), axis=1), cmap="Greys")
plt.axis("off")
plt.show()

# %% [markdown]
# ## The corruption process
# Mix each image with uniform noise by an `amount` in [0, 1], exactly as the course's `corrupt`.


# %%
def corrupt(x, amount, key):
    noise = jax.random.uniform(key, x.shape)
    amount = amount.reshape(-1, 1, 1, 1)
    return x * (1 - amount) + noise * amount


amounts = jnp.linspace(0, 1, 8)
noised = corrupt(data[:8], amounts, jax.random.key(0))
fig, axes = plt.subplots(2, 1, figsize=(8, 2.5))
axes[0].imshow(np.concatenate(list(data[:8, ..., 0]), axis=1), cmap="Greys")
axes[0].set_title("input data")
axes[1].imshow(np.concatenate(list(noised[..., 0]), axis=1), cmap="Greys")
axes[1].set_title("corrupted, amount 0 -> 1")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## A basic UNet, in Flax NNX
# Three 5x5 convolutions down (max-pooling between), three up (upsampling between), with skip
# connections: the course's `BasicUNet`, layer for layer.


# %%
class BasicUNet(nnx.Module):
    def __init__(self, in_channels=1, out_channels=1, *, rngs: nnx.Rngs):
        conv = lambda i, o: nnx.Conv(i, o, (5, 5), padding=2, rngs=rngs)  # noqa: E731
        self.down_layers = nnx.List([conv(in_channels, 32), conv(32, 64), conv(64, 64)])
        self.up_layers = nnx.List([conv(64, 64), conv(64, 32), conv(32, out_channels)])

    def __call__(self, x):
        skips = []
        for i, layer in enumerate(self.down_layers):
            x = jax.nn.silu(layer(x))
            if i < 2:
                skips.append(x)
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        for i, layer in enumerate(self.up_layers):
            if i > 0:
                x = jax.image.resize(x, (x.shape[0], x.shape[1] * 2, x.shape[2] * 2, x.shape[3]), "nearest")
                x = x + skips.pop()
            x = jax.nn.silu(layer(x))
        return x


net = BasicUNet(rngs=nnx.Rngs(0))
print(f"BasicUNet: {sum(p.size for p in jax.tree.leaves(nnx.state(net, nnx.Param))):,} parameters")

# %% [markdown]
# ## Training: predict the clean image from the corrupted one (MSE)
# One jitted step; batches drawn on the device from the data array.

# %%
BATCH, STEPS = (64, 60) if QUICK else (128, 3 * len(data) // 128)  # the course: 3 epochs of batch 128
optimizer = nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def basic_step(net, optimizer, key):
    batch_key, amount_key, noise_key = jax.random.split(key, 3)
    x = data[jax.random.randint(batch_key, (BATCH,), 0, len(data))]
    amount = jax.random.uniform(amount_key, (BATCH,))
    noisy = corrupt(x, amount, noise_key)
    loss, grads = nnx.value_and_grad(lambda net: jnp.mean((net(noisy) - x) ** 2))(net)
    optimizer.update(net, grads)
    return loss


start, basic_losses = time.perf_counter(), []
for step in range(STEPS):
    basic_losses.append(basic_step(net, optimizer, jax.random.fold_in(jax.random.key(1), step)))
basic_losses = np.asarray(jax.device_get(basic_losses))
print(f"{STEPS} steps of batch {BATCH} in {time.perf_counter() - start:.0f}s; loss {basic_losses[:10].mean():.4f} "
      f"-> {basic_losses[-10:].mean():.4f}")
plt.figure(figsize=(5, 2.5))
plt.plot(basic_losses)
plt.ylim(0, None)
plt.title("BasicUNet training loss")
plt.show()

# %% [markdown]
# ## Sampling: start from noise, step towards the prediction
# The course's simple iterative sampler: at step i, move 1/(n - i) of the way to the model's guess.


# %%
def basic_sample(net, n_images=8, n_steps=5, key=jax.random.key(2)):
    x = jax.random.uniform(key, (n_images, 28, 28, 1))
    for i in range(n_steps):
        prediction = net(x)
        mix_factor = 1 / (n_steps - i)
        x = x * (1 - mix_factor) + prediction * mix_factor
    return np.asarray(x.clip(0, 1))


basic_samples = basic_sample(net, n_images=16, n_steps=40)
plt.figure(figsize=(8, 1))
plt.imshow(np.concatenate(list(basic_samples[:8, ..., 0]), axis=1), cmap="Greys")
plt.axis("off")
plt.show()

# %% [markdown]
# ## The same task with flaxdiff
# The diffusers `UNet2DModel` architecture (`flaxdiff.UNet2D`), the DDPM noise schedule
# (`NoiseSchedule`, `add_noise`), the epsilon-prediction loss of the DDPM paper, and a 50-step DDIM
# sampler that runs as one `jax.lax.scan`.

# %%
from flaxdiff import NoiseSchedule, UNet2D, add_noise, make_sampler, sample_loop  # noqa: E402

unet_config = dict(sample_size=28, in_channels=1, out_channels=1, norm_num_groups=8, attention_head_dim=8,
                   layers_per_block=1 if QUICK else 2,
                   block_out_channels=(16, 32, 32) if QUICK else (32, 64, 64),
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
unet = UNet2D(unet_config, rngs=nnx.Rngs(0))
schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
print(f"UNet2D: {sum(p.size for p in jax.tree.leaves(nnx.state(unet, nnx.Param))):,} parameters")

UNET_BATCH, UNET_STEPS = (32, 120) if QUICK else (128, 10 * len(data) // 128)
unet_optimizer = nnx.Optimizer(unet, optax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3 if QUICK else 1e-3,
                                                                                    30 if QUICK else 500, UNET_STEPS),
                                                 b1=0.95, weight_decay=1e-6), wrt=nnx.Param)


@nnx.jit
def diffusion_step(unet, optimizer, key):
    batch_key, t_key, noise_key = jax.random.split(key, 3)
    x0 = data[jax.random.randint(batch_key, (UNET_BATCH,), 0, len(data))] * 2 - 1  # [-1, 1]
    t = jax.random.randint(t_key, (UNET_BATCH,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(noise_key, x0.shape)
    noisy = add_noise(schedule, x0, noise, t)
    loss, grads = nnx.value_and_grad(lambda unet: jnp.mean((unet(noisy, t) - noise) ** 2))(unet)
    optimizer.update(unet, grads)
    return loss


start, unet_losses = time.perf_counter(), []
for step in range(UNET_STEPS):
    unet_losses.append(diffusion_step(unet, unet_optimizer, jax.random.fold_in(jax.random.key(3), step)))
unet_losses = np.asarray(jax.device_get(unet_losses))
print(f"{UNET_STEPS} steps of batch {UNET_BATCH} in {time.perf_counter() - start:.0f}s; loss "
      f"{unet_losses[:10].mean():.4f} -> {unet_losses[-10:].mean():.4f}")

sampler = make_sampler("ddim", {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
graphdef, params = nnx.split(unet)
sample = jax.jit(lambda params, latents: sample_loop(lambda x, t: nnx.merge(graphdef, params)(x, t),
                                                     sampler.plan(50), latents))
unet_samples = np.asarray(sample(params, jax.random.normal(jax.random.key(4), (16, 28, 28, 1))) / 2 + 0.5).clip(0, 1)

# %% [markdown]
# ## Both results

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
for ax, images, title in ((axes[0], basic_samples, f"BasicUNet, {STEPS} steps,\n40-step iterative sampler"),
                          (axes[1], unet_samples, f"flaxdiff UNet2D, {UNET_STEPS} steps,\n50-step DDIM")):
    grid = images[:16, ..., 0].reshape(4, 4, 28, 28).transpose(0, 2, 1, 3).reshape(4 * 28, 4 * 28)
    ax.imshow(grid, cmap="Greys")
    ax.set_title(title)
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUTPUT, dpi=100)
print(f"wrote {OUTPUT}")
plt.show()
