"""The training math against PyTorch/diffusers, and the data-parallel step's invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from flax import nnx

from flaxdiff import parallel
from flaxdiff.choices import LR_SCHEDULERS
from flaxdiff.diffusers_io import load_unet
from flaxdiff.schedule import NoiseSchedule, add_noise
from flaxdiff.training.step import (TrainStepConfig, create_train_state, diffusion_loss, ema_decay, ema_update,
                                    learning_rate_schedule, make_optimizer, make_train_step)
from flaxdiff.unet import UNet2D
from torch_models import perturbed_unet

from cli_runs import MICRO


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_schedules_match_diffusers(name):
    total, warmup, lr = 120, 17, 3e-4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours = learning_rate_schedule(TrainStepConfig(learning_rate=lr, lr_scheduler=name, lr_warmup_steps=warmup,
                                             total_steps=total))
    expected = []
    for _ in range(total + 5):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    got = [float(ours(step)) for step in range(total + 5)]
    # float32 against float64: 1e-6 of the peak learning rate
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=lr * 1e-6)


def test_adamw_with_clipping_matches_torch():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    config = TrainStepConfig(learning_rate=1e-2, lr_scheduler="constant", adam_weight_decay=0.1, max_grad_norm=1.0)
    torch_params = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    optimizer = torch.optim.AdamW(torch_params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    tx = make_optimizer(config)
    jax_params = [jnp.asarray(p) for p in params]
    state = tx.init(jax_params)
    for step in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) * (3.0 if step % 2 else 0.1) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(torch_params, config.max_grad_norm)
        optimizer.step()
        updates, state = tx.update([jnp.asarray(g) for g in grads], state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
    for ours, theirs in zip(jax_params, torch_params):
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=2e-6, atol=2e-7)


def test_ema_matches_diffusers_emamodel():
    rng = np.random.default_rng(1)
    inv_gamma, power, max_decay = 1.0, 0.75, 0.995  # the cap is reached at step ~1170
    weights = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    torch_params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    ema = EMAModel(torch_params, decay=max_decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
    ours = [jnp.asarray(w) for w in weights]
    decays = []
    for step in range(1, 3001):
        new = [w + rng.standard_normal(w.shape).astype(np.float32) * 0.1 for w in weights]
        weights = new
        with torch.no_grad():
            for p, w in zip(torch_params, new):
                p.copy_(torch.tensor(w))
        ema.step(torch_params)
        decay = ema_decay(step, inv_gamma, power, max_decay)
        ours = ema_update(ours, [jnp.asarray(w) for w in new], decay)
        decays.append((float(decay), ema.cur_decay_value))
    np.testing.assert_allclose([d for d, _ in decays], [d for _, d in decays], rtol=1e-6, atol=1e-7)
    assert decays[0][1] == 0.0 and decays[-1][1] == max_decay
    for got, shadow in zip(ours, ema.shadow_params):
        np.testing.assert_allclose(np.asarray(got), shadow.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_and_gradients_match_diffusers(prediction_type, tmp_path):
    """train_unconditional's loss on the same UNet weights, images, noise and timesteps, and its
    gradient with respect to every weight."""
    torch_unet = perturbed_unet(MICRO, seed=2).train()
    torch_unet.save_pretrained(tmp_path)
    unet = load_unet(tmp_path)
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    schedule = NoiseSchedule.from_config(scheduler.config)
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    timesteps = np.array([0, 17, 480, 999])
    tx0, tnoise, tt = (torch.tensor(x0.transpose(0, 3, 1, 2)), torch.tensor(noise.transpose(0, 3, 1, 2)),
                       torch.tensor(timesteps))
    output = torch_unet(scheduler.add_noise(tx0, tnoise, tt), tt).sample
    if prediction_type == "epsilon":
        ref_loss = F.mse_loss(output, tnoise)
    elif prediction_type == "sample":
        alpha = scheduler.alphas_cumprod[tt].reshape(-1, 1, 1, 1)
        ref_loss = (alpha / (1 - alpha) * F.mse_loss(output, tx0, reduction="none")).mean()
    else:
        ref_loss = F.mse_loss(output, scheduler.get_velocity(tx0, tnoise, tt))
    ref_loss.backward()
    graphdef, params = nnx.split(unet)

    def loss_fn(p):
        t = jnp.asarray(timesteps)
        out = nnx.merge(graphdef, p)(add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), t), t)
        return diffusion_loss(out, jnp.asarray(x0), jnp.asarray(noise), t, schedule, prediction_type)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(nnx.to_pure_dict(params))
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    unet_grads = nnx.merge(graphdef, grads)
    from flaxdiff.diffusers_io import unet_state_dict
    ours = unet_state_dict(unet_grads)
    ref_grads = {name: param.grad.numpy() for name, param in torch_unet.named_parameters()}
    # the attention key biases have an exact zero gradient (softmax ignores a shift shared by all
    # keys); both sides hold ~1e-10 of rounding there, so errors are scaled by the largest gradient
    floor = 1e-3 * max(float(np.abs(g).max()) for g in ref_grads.values())
    worst = max(float(np.abs(ours[name] - ref).max() / max(float(np.abs(ref).max()), floor))
                for name, ref in ref_grads.items())
    print(f"\n{prediction_type}: loss {float(loss):.6f} vs {ref_loss.item():.6f}, largest relative gradient "
          f"error {worst:.2e}")
    assert worst < 4e-5  # measured 3.8e-6 to 4.4e-6 (jax 0.10.2, torch 2.13 CPU): ~10x


# --------------------------------------------------------------------------- the data-parallel step
@pytest.fixture(scope="module")
def micro_setup():
    unet = UNet2D(MICRO, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(unet)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 2, 8, 16, 16, 3), dtype=np.uint8)  # (steps, accumulation, batch, ...)
    return graphdef, nnx.to_pure_dict(params), images


def run_steps(graphdef, params, images, devices, config, steps_per_dispatch=1, grad_norms=False):
    """Train on `images` (steps, accumulation, batch, H, W, C); returns final params and losses.
    With `grad_norms=True`, also the gradient norm of each step."""
    mesh = parallel.make_mesh(devices)
    state = parallel.replicate(create_train_state(jax.tree.map(jnp.copy, params), config), mesh)
    step = make_train_step(graphdef, NoiseSchedule.from_config(), config, mesh, seed=5)
    losses, norms = [], []
    for first in range(0, len(images), steps_per_dispatch):
        batch = parallel.global_batch(images[first:first + steps_per_dispatch], mesh, batch_axis=2)
        state, metrics = step(state, batch)
        losses.extend(np.asarray(metrics["loss"]).tolist())
        norms.extend(np.asarray(metrics["grad_norm"]).tolist())
    if grad_norms:
        return jax.tree.map(np.asarray, state), losses, norms
    return jax.tree.map(np.asarray, state), losses


def max_param_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Tolerances. AdamW's update lr * m / (sqrt(v) + eps) has slope lr / eps = 1e5 at a zero gradient,
# so float rounding in a near-zero gradient element (~1e-10) moves that parameter by up to ~1e-5
# per step. Attention key biases are the extreme case: their exact gradient is zero (softmax
# ignores a shift shared by all keys), so they are pure amplified rounding.
PARAM_TOLERANCE = 1e-4  # after 3 steps at lr 1e-3: a tenth of one step's size


def test_four_devices_equal_one_device(micro_setup):
    """The same global batch on 4 devices and on 1: the same losses, gradient norms and weights.
    Adam's epsilon is 1e-6 here (diffusers: 1e-8) so that parameters whose exact gradient is zero
    (see PARAM_TOLERANCE) move by lr * rounding / 1e-6, not by a good part of lr."""
    graphdef, params, images = micro_setup
    config = TrainStepConfig(learning_rate=1e-3, lr_warmup_steps=0, total_steps=10, use_ema=True, random_flip=True,
                        adam_epsilon=1e-6)
    assert len(jax.devices()) == 4
    one, losses_one, norms_one = run_steps(graphdef, params, images[:, :1], jax.devices()[:1], config,
                                           grad_norms=True)
    four, losses_four, norms_four = run_steps(graphdef, params, images[:, :1], jax.devices(), config,
                                              grad_norms=True)
    diff = max_param_difference(one.params, four.params)
    print(f"\n1 vs 4 devices after 3 steps: largest parameter difference {diff:.2e}, losses {losses_one} "
          f"vs {losses_four}, gradient norms {norms_one} vs {norms_four}")
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    # the gradient is the mean over the global batch, not a sum over devices (Adam would hide a
    # factor of 4 in the weights; clipping and the logged grad_norm would not)
    np.testing.assert_allclose(norms_one, norms_four, rtol=1e-4)
    assert diff < PARAM_TOLERANCE
    assert max_param_difference(one.ema_params, four.ema_params) < PARAM_TOLERANCE


def test_accumulation_equals_one_big_batch(micro_setup):
    """2 micro-batches of 8 accumulated == one batch of 16 (same images, noise and timesteps)."""
    graphdef, params, images = micro_setup
    config = TrainStepConfig(learning_rate=1e-3, lr_warmup_steps=0, total_steps=10)
    accumulated, losses_acc = run_steps(graphdef, params, images, jax.devices(), config)
    big = images.reshape(3, 1, 16, 16, 16, 3)
    single, losses_big = run_steps(graphdef, params, big, jax.devices(), config)
    diff = max_param_difference(accumulated.params, single.params)
    print(f"\n2x8 accumulated vs 1x16: largest parameter difference {diff:.2e}")
    np.testing.assert_allclose(losses_acc, losses_big, rtol=1e-5)
    assert diff < PARAM_TOLERANCE


def test_steps_per_dispatch_is_the_same_trajectory(micro_setup):
    """K steps in one dispatch follow K single steps. Not bit for bit: XLA compiles the K-step
    program as a whole and fuses across step boundaries, so float rounding differs (~1e-7)."""
    graphdef, params, images = micro_setup
    # the config of test_four_devices_equal_one_device: its single-step program comes from the cache
    config = TrainStepConfig(learning_rate=1e-3, lr_warmup_steps=0, total_steps=10, use_ema=True, random_flip=True,
                        adam_epsilon=1e-6)
    single, losses_single = run_steps(graphdef, params, images[:, :1], jax.devices(), config)
    fused, losses_fused = run_steps(graphdef, params, images[:, :1], jax.devices(), config, steps_per_dispatch=3)
    diff = max_param_difference(single.params, fused.params)
    print(f"\n3 steps in 1 dispatch vs 3 dispatches: largest parameter difference {diff:.1e}")
    np.testing.assert_allclose(losses_single, losses_fused, rtol=1e-6)
    assert diff < PARAM_TOLERANCE / 10
    assert max_param_difference(single.ema_params, fused.ema_params) < PARAM_TOLERANCE / 10
    assert int(single.step) == int(fused.step) == 3


# --------------------------------------------------------------------------- a dataset in device memory
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 2, 4)])  # (steps K, accumulation, micro_batch)
def test_device_dataset_gathers_the_host_batch(shape):
    """Batches gathered on the devices from the replicated dataset (as the train step gathers
    them) are the host's, bit for bit, and each device holds only its slice of the micro-batch axis."""
    from flaxdiff.training.feed import DeviceDataset, gather_batch
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
    mesh = parallel.make_mesh()
    data = DeviceDataset(images, mesh)
    assert all(shard.data.shape == images.shape for shard in data.data.addressable_shards)
    indices = rng.integers(0, len(images), shape)
    batch = jax.jit(lambda d, i: gather_batch(d, i, mesh))(data.data, data.indices(indices))
    assert batch.dtype == np.uint8 and batch.shape == (*shape, 5, 6, 3)
    np.testing.assert_array_equal(np.asarray(batch), images[indices])
    for shard in batch.addressable_shards:
        assert shard.data.shape[2] == shape[2] // len(jax.devices())
        np.testing.assert_array_equal(np.asarray(shard.data), images[indices][shard.index])


def test_dataset_placement_policy(monkeypatch):
    from flaxdiff.training.feed import dataset_placement
    from flaxdiff.training.options import OptionsError
    GiB = 2**30
    monkeypatch.setattr(parallel, "device_memory_bytes", lambda: 16 * GiB)  # an accelerator with 16 GiB
    assert dataset_placement("auto", 4 * GiB)[0] and not dataset_placement("auto", 5 * GiB)[0]
    assert dataset_placement("yes", 10 * GiB)[0] and not dataset_placement("no", 1)[0]
    with pytest.raises(OptionsError, match="--dataset_on_device no"):
        dataset_placement("yes", 15 * GiB)
    monkeypatch.setattr(parallel, "device_memory_bytes", lambda: None)  # CPU devices: copies in host memory
    monkeypatch.setattr(parallel, "host_memory_bytes", lambda: 40 * GiB)
    copies = len(jax.local_devices())
    from flaxdiff import backend
    # CPU devices share host memory: the host path, unless the process takes the TPU/GPU paths
    assert dataset_placement("auto", 1)[0] is backend.forced()
    assert dataset_placement("yes", 30 * GiB // copies)[0]
    with pytest.raises(OptionsError, match="host memory"):
        dataset_placement("yes", 37 * GiB // copies)


# --------------------------------------------------------------------------- bf16 and rematerialisation
def _loss_and_grads(dtype, remat):
    """The epsilon loss of the micro UNet on one fixed batch, and its gradient (float32 weights)."""
    schedule = NoiseSchedule.from_config()
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32))
    noise = jnp.asarray(rng.standard_normal(x0.shape).astype(np.float32))
    t = jnp.asarray(rng.integers(0, 1000, 8))
    graphdef, params = nnx.split(UNet2D(MICRO, rngs=nnx.Rngs(0), dtype=dtype, gradient_checkpointing=remat))

    def loss_fn(p):
        output = nnx.merge(graphdef, p)(add_noise(schedule, x0, noise, t), t)
        return diffusion_loss(output, x0, noise, t, schedule, "epsilon")
    return jax.jit(jax.value_and_grad(loss_fn))(nnx.to_pure_dict(params))


def _relative(grads, reference) -> float:
    """|g - ref| / |ref| over all gradients as one vector."""
    diff = np.sqrt(sum(float(jnp.sum((g - r) ** 2)) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))))
    return diff / np.sqrt(sum(float(jnp.sum(r ** 2)) for r in jax.tree.leaves(reference)))


@pytest.fixture(params=[True, False], ids=["cpu-kernels", "plain"])
def kernels(request, monkeypatch):
    from flaxdiff import ops
    monkeypatch.setattr(ops, "CPU_KERNELS", request.param)
    return request.param


def test_gradient_checkpointing_changes_nothing(kernels):
    """Rematerialised UNet blocks give the loss and gradients of the plain model, on the CPU
    layers and on the plain layers TPUs/GPUs run (measured: loss equal, gradients 5e-8 relative on
    the CPU layers, 3.6e-7 on the plain ones)."""
    loss, grads = _loss_and_grads(jnp.float32, remat=False)
    remat_loss, remat_grads = _loss_and_grads(jnp.float32, remat=True)
    error = _relative(remat_grads, grads)
    print(f"\n--gradient_checkpointing ({'CPU' if kernels else 'plain'} layers): loss {float(remat_loss):.7f} vs "
          f"{float(loss):.7f}, gradients {error:.1e} relative")
    assert abs(float(remat_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    assert error <= 1e-6


def test_bf16_compute_keeps_float32_and_stays_close(kernels):
    """--mixed_precision bf16: bfloat16 compute with float32 weights and gradients; the loss and the
    gradient stay within bf16 rounding of float32's on the same batch (measured: loss 3e-5,
    gradients 1.4e-2 relative)."""
    loss, grads = _loss_and_grads(jnp.float32, remat=False)
    bf16_loss, bf16_grads = _loss_and_grads(jnp.bfloat16, remat=False)
    assert {x.dtype for x in jax.tree.leaves(bf16_grads)} == {np.dtype(np.float32)}
    error = _relative(bf16_grads, grads)
    print(f"\nbf16 ({'CPU' if kernels else 'plain'} layers): loss {float(bf16_loss):.5f} vs {float(loss):.5f}, "
          f"gradients {error:.1e} relative")
    assert abs(float(bf16_loss) - float(loss)) <= 1e-3 * abs(float(loss))
    assert error <= 5e-2


def test_loss_falls_in_float32_and_in_bf16(micro_setup):
    """30 steps on a fixed batch of generated shapes bring the loss down, and bf16 compute brings
    it down as float32 does, with the train state (weights, EMA, Adam moments) kept in float32."""
    from flaxdiff.data import DataSpec, load_images
    _, params, _ = micro_setup
    images = load_images(DataSpec(resolution=16, num_shapes=32), progress=False)
    batches = np.stack([images[None]] * 30)[:, :, :32]
    finals = {}
    for precision in ("no", "bf16"):
        graphdef = nnx.graphdef(UNet2D(MICRO, rngs=nnx.Rngs(0), dtype=jnp.bfloat16 if precision == "bf16"
                                       else jnp.float32))
        config = TrainStepConfig(learning_rate=2e-3, lr_scheduler="constant", lr_warmup_steps=0, total_steps=30,
                                 use_ema=True, mixed_precision=precision)
        state, losses = run_steps(graphdef, params, batches, jax.devices(), config)
        assert {x.dtype for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
                if hasattr(x, "dtype") and x.dtype.kind == "f"} == {np.dtype(np.float32)}
        finals[precision] = (np.mean(losses[:5]), np.mean(losses[-5:]))
    print(f"\nloss, first and last 5 of 30 steps: float32 {finals['no']}, bf16 {finals['bf16']}")
    assert finals["no"][1] < 0.6 * finals["no"][0]
    assert finals["bf16"][1] < 0.6 * finals["bf16"][0]
    assert abs(finals["bf16"][1] - finals["no"][1]) < 0.2 * finals["no"][1]
