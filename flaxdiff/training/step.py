"""The train step: the loss, learning-rate schedules, AdamW with clipping, EMA, the data-parallel step.

Everything here is a pure function of arrays and pytrees; the loop that feeds it (files, clocks,
progress bars) is `flaxdiff.training.loop`. The numbers follow diffusers' `train_unconditional.py`:

* loss: epsilon -> MSE to the noise; sample -> MSE to x_0 weighted by SNR = a / (1 - a);
  v_prediction -> MSE to `get_velocity` (Salimans & Ho 2022).
* optimizer: AdamW (PyTorch's decoupled weight decay) after gradient-norm clipping as
  `torch.nn.utils.clip_grad_norm_` does it (scale by max_norm / (norm + 1e-6) when above).
* learning rate: diffusers' `get_scheduler` lambdas, counted in optimizer steps (diffusers'
  script multiplies the warmup by the accumulation steps, a known miscount we do not copy).
* EMA: diffusers' `EMAModel(use_ema_warmup=True)` decay 1 - (1 + step / inv_gamma) ** -power,
  capped at max_decay; used for sampling and saving only, never written back into training.

The step runs per device under `jax.shard_map` on a 1-D mesh: each device computes the loss and
gradients of its slice of the batch, `lax.pmean` averages them, and the (replicated) optimizer
update follows. A step's batch is (accumulation, micro_batch, H, W, C) uint8: the micro-batches
are a loop inside the same program, so k accumulated micro-batches of b images give the
same update as one batch of k*b.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from ..backend import accelerator_paths
from ..choices import LR_SCHEDULERS, PREDICTION_TYPES, check_choice
from ..images import to_model_range
from ..parallel import AXIS, per_device, replicated
from ..schedule import NoiseSchedule, add_noise, signal_to_noise, training_target


# --------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class TrainStepConfig:
    """What the compiled train step depends on (hashable: a static argument)."""

    prediction_type: str = "epsilon"
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    total_steps: int = 1000
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    random_flip: bool = False
    mixed_precision: str = "no"  # "no" | "bf16"
    class_conditional: bool = False  # batches are (images, labels)
    class_dropout_prob: float = 0.0  # share of labels replaced by null_class_label (classifier-free guidance)
    null_class_label: int = 0


# --------------------------------------------------------------------------- learning rate
def lr_multiplier(name: str, step, warmup: int, total: int, num_cycles: float | None = None,
                  power: float = 1.0, lr_init: float = 1.0, lr_end: float = 1e-7):
    """diffusers.optimization's lr_lambda(step) for `name` (jnp, works on traced steps)."""
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(1, warmup)
    decay_span = max(1, total - warmup)
    if name == "constant":
        return jnp.ones_like(step)
    if name == "constant_with_warmup":
        return jnp.where(step < warmup, warm, 1.0)
    if name == "linear":
        return jnp.where(step < warmup, warm, jnp.maximum(0.0, (total - step) / decay_span))
    if name == "cosine":
        cycles = 0.5 if num_cycles is None else num_cycles
        progress = (step - warmup) / decay_span
        return jnp.where(step < warmup, warm,
                         jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * progress))))
    if name == "cosine_with_restarts":
        cycles = 1 if num_cycles is None else num_cycles
        progress = (step - warmup) / decay_span
        value = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.mod(cycles * progress, 1.0))))
        return jnp.where(step < warmup, warm, jnp.where(progress >= 1.0, 0.0, value))
    if name == "polynomial":
        if not lr_init > lr_end:
            raise ValueError(f"polynomial decay needs learning_rate > lr_end ({lr_end}), got {lr_init}")
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        decayed = ((lr_init - lr_end) * remaining**power + lr_end) / lr_init
        return jnp.where(step < warmup, warm, jnp.where(step > total, lr_end / lr_init, decayed))
    check_choice("lr_scheduler", name, LR_SCHEDULERS)


def learning_rate_schedule(config: TrainStepConfig):
    """optax schedule: optimizer step count (0-based) -> learning rate (diffusers' default cycles, power)."""
    return lambda count: config.learning_rate * lr_multiplier(
        config.lr_scheduler, count, config.lr_warmup_steps, config.total_steps, lr_init=config.learning_rate)


# --------------------------------------------------------------------------- optimizer
def clip_grad_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6))."""
    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: TrainStepConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_beta1, b2=config.adam_beta2,
                        eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
    if config.max_grad_norm and config.max_grad_norm > 0:
        return optax.chain(clip_grad_norm_torch(config.max_grad_norm), adamw)
    return adamw


# --------------------------------------------------------------------------- EMA
def ema_decay(optimization_step, inv_gamma: float, power: float, max_decay: float, min_decay: float = 0.0):
    """EMAModel.get_decay with use_ema_warmup (optimization_step counts updates, 1-based)."""
    step = jnp.maximum(0, jnp.asarray(optimization_step) - 1).astype(jnp.float32)
    value = 1.0 - (1.0 + step / inv_gamma) ** -power
    value = jnp.maximum(jnp.minimum(value, max_decay), min_decay)
    return jnp.where(step <= 0, 0.0, value)


def ema_update(ema_params, params, decay):
    """ema <- ema - (1 - decay) (ema - params), EMAModel.step's update."""
    one_minus = 1.0 - decay
    return jax.tree.map(lambda e, p: e - one_minus * (e - p), ema_params, params)


# --------------------------------------------------------------------------- loss
def diffusion_loss(model_output, x0, noise, timesteps, schedule: NoiseSchedule, prediction_type: str):
    """diffusers' training loss: MSE to the training target (mean over batch and pixels), weighted
    by the SNR for `sample` prediction (Salimans & Ho 2022) as train_unconditional does."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    model_output = model_output.astype(jnp.float32)
    squared_error = (model_output - training_target(schedule, x0, noise, timesteps, prediction_type)) ** 2
    if prediction_type == "sample":
        return jnp.mean(signal_to_noise(schedule, timesteps, x0) * squared_error)
    return jnp.mean(squared_error)


# --------------------------------------------------------------------------- state
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # optimizer steps done
    params: Any  # pure dict of float32 arrays
    opt_state: Any
    ema_params: Any  # same structure as params, or None without EMA


def create_train_state(params, config: TrainStepConfig) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    ema = jax.tree.map(jnp.copy, params) if config.use_ema else None
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(config).init(params), ema)


def sampling_params(state: TrainState):
    """The weights to sample and save with: the EMA if there is one."""
    return state.ema_params if state.ema_params is not None else state.params


# --------------------------------------------------------------------------- the step
def _unrolled_scan(body, carry, xs):
    """`lax.scan` written out as straight-line code.

    XLA:CPU runs the convolutions of a backward pass many times slower when they sit inside a loop
    or a called computation, which is what `lax.scan` (even with `unroll=True`) produces
    (jax-ml/jax#12868; benchmarks/cpu_loop_convolutions.py measures it). On CPUs the scans over
    micro-batches and over the steps of a dispatch are therefore inlined: the same program,
    one dispatch, with compile time growing with their length. Accelerators keep `lax.scan`.
    """
    length = jax.tree.leaves(xs)[0].shape[0]
    outputs = []
    for i in range(length):
        carry, out = body(carry, jax.tree.map(lambda a: a[i], xs))
        outputs.append(out)
    stacked = None if outputs[0] is None else jax.tree.map(lambda *o: jnp.stack(o), *outputs)
    return carry, stacked


def make_train_step(graphdef, schedule: NoiseSchedule, config: TrainStepConfig, mesh, seed: int, gather=None):
    """A jitted, data-parallel `step(state, batch) -> (state, metrics)`.

    batch: uint8 images (K, accumulation, micro_batch, H, W, C) sharded over micro_batch; K > 1
    runs K optimizer steps in one dispatch; for a class-conditional step, (images, int32 labels
    (K, accumulation, micro_batch)). metrics are (K,) arrays: loss, lr, grad_norm, ema_decay. The
    state is donated.

    With `gather(data, indices) -> batch` (`feed.gather_batch`) the step is
    `step(state, indices, data)` with int32 image indices (K, accumulation, micro_batch) and data
    the dataset already in device memory: the batch is gathered inside the same program.
    """
    tx = make_optimizer(config)
    schedule_fn = learning_rate_schedule(config)
    loop = jax.lax.scan if accelerator_paths() else _unrolled_scan
    base_key = jax.random.key(seed)
    num_train_timesteps = schedule.num_train_timesteps

    def local_loss_and_grads(params, x0, noise, timesteps, labels, dropout_key):
        """Per device: loss and gradients of its slice, averaged over devices."""
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))
        # Differentiate per-device copies of the replicated weights: the gradient of a replicated
        # (invariant) input would already be summed over devices, and pmean would leave that sum.
        params = per_device(params)

        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            noisy = add_noise(schedule, x0, noise, timesteps)
            output = model(noisy, timesteps, class_labels=labels, dropout_key=dropout_key)
            return diffusion_loss(output, x0, noise, timesteps, schedule, config.prediction_type)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS)

    sharded_grads = jax.shard_map(local_loss_and_grads, mesh=mesh,
                                  in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()), out_specs=(P(), P()))

    def one_step(state: TrainState, batch):
        images, labels = batch if config.class_conditional else (batch, None)
        key = jax.random.fold_in(base_key, state.step)
        x0 = to_model_range(images)  # (accumulation, micro_batch, H, W, C)
        if config.random_flip:
            flip = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x0.shape[:2])
            x0 = jnp.where(flip[..., None, None, None], x0[..., ::-1, :], x0)
        noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
        timesteps = jax.random.randint(jax.random.fold_in(key, 2), x0.shape[:2], 0, num_train_timesteps)
        dropout_key = jax.random.fold_in(key, 3)
        if labels is not None and config.class_dropout_prob > 0:  # the null class, for guidance
            drop = jax.random.bernoulli(jax.random.fold_in(key, 4), config.class_dropout_prob, labels.shape)
            labels = jnp.where(drop, config.null_class_label, labels)

        def micro(carry, inputs):
            loss_sum, grad_sum = carry
            i, x0_i, noise_i, t_i, labels_i = inputs
            loss, grads = sharded_grads(state.params, x0_i, noise_i, t_i, labels_i,
                                        jax.random.fold_in(dropout_key, i))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        accumulation = x0.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, grads), _ = loop(micro, (jnp.zeros((), jnp.float32), zeros),
                                (jnp.arange(accumulation), x0, noise, timesteps, labels))
        loss = loss / accumulation
        grads = jax.tree.map(lambda g: g / accumulation, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        metrics = {"loss": loss, "lr": schedule_fn(state.step), "grad_norm": grad_norm}
        ema = state.ema_params
        if ema is not None:
            decay = ema_decay(step, config.ema_inv_gamma, config.ema_power, config.ema_max_decay)
            ema = ema_update(ema, params, decay)
            metrics["ema_decay"] = decay
        return TrainState(step, params, opt_state, ema), metrics

    def steps(state: TrainState, batch, data=None):
        if gather is not None:
            batch = gather(data, batch)
        return loop(one_step, state, batch)

    state_sharding = replicated(mesh)
    return jax.jit(steps, donate_argnums=0, out_shardings=(state_sharding, state_sharding))

