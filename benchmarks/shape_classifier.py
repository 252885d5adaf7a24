"""A small CNN that tells the built-in dataset's four shapes apart: the judge of generated shapes.

Trained on the real shapes (the `train` split, a few thousand images) and checked on the held-out
`test` split; the benchmarks then ask it which shape each *generated* image shows, which measures
whether a model draws recognisable shapes (and, for a class-conditional model, the class it was
asked for). Not part of the package: a measuring instrument for benchmarks/.

    from shape_classifier import train_shape_classifier
    judge = train_shape_classifier(resolution=32)        # ~1 minute on 2 CPU cores
    kinds = judge.predict(images_uint8)                  # (N,) in 0..3: circle, square, triangle, cross
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclasses.dataclass
class ShapeClassifier:
    probabilities_fn: object
    test_accuracy: float  # on the held-out real shapes

    def probabilities(self, images_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
        """(N, 4) class probabilities: circle, square, triangle, cross."""
        return np.concatenate([np.asarray(self.probabilities_fn(images_uint8[i:i + batch]))
                               for i in range(0, len(images_uint8), batch)])

    def predict(self, images_uint8: np.ndarray) -> np.ndarray:
        return self.probabilities(images_uint8).argmax(-1)

    def recognisable(self, images_uint8: np.ndarray, confidence: float = 0.9) -> float:
        """The share of images it calls some shape with at least `confidence` (real shapes: ~1)."""
        return float((self.probabilities(images_uint8).max(-1) >= confidence).mean())


def colour_statistics(images_uint8: np.ndarray) -> dict:
    """Per image, the contrast (standard deviation of the luminance) and the colourfulness (mean
    saturation), averaged: grey, washed-out samples have little of both; saturated colour fields
    have colour without contrast."""
    x = images_uint8.astype(np.float32) / 255.0
    luminance = x @ np.array([0.299, 0.587, 0.114], np.float32)
    saturation = (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6)
    return {"contrast": float(luminance.reshape(len(x), -1).std(-1).mean()),
            "saturation": float(saturation.reshape(len(x), -1).mean(-1).mean())}


def train_shape_classifier(resolution: int = 32, num_images: int = 4096, steps: int = 1500, seed: int = 0,
                           log=print) -> ShapeClassifier:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flaxdiff.compat import ModuleList
    from flaxdiff.data import DataSpec, load_labeled_images
    from flaxdiff.images import to_model_range

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.convs = ModuleList([nnx.Conv(3, 32, (3, 3), rngs=rngs), nnx.Conv(32, 64, (3, 3), rngs=rngs),
                                     nnx.Conv(64, 64, (3, 3), rngs=rngs)])
            self.head = nnx.Linear(64, 4, rngs=rngs)

        def __call__(self, x):
            for conv in self.convs:
                x = nnx.avg_pool(jax.nn.relu(conv(x)), (2, 2), (2, 2))
            return self.head(x.mean(axis=(1, 2)))

    train = load_labeled_images(DataSpec(resolution=resolution, num_shapes=num_images, seed=seed), progress=False)
    test = load_labeled_images(DataSpec(resolution=resolution, num_shapes=1024, seed=seed, split="test"),
                               progress=False)
    model = Net(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    def blur(x, times):
        """A 3x3 box blur applied `times` (per image, 0 to 2) times: generated shapes are softer than real ones."""
        kernel = jnp.ones((3, 3, 1, x.shape[-1]), x.dtype) / 9.0  # depthwise: each channel on its own
        for k in range(2):
            blurred = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=x.shape[-1],
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jnp.where((times > k)[:, None, None, None], blurred, x)
        return x

    @nnx.jit
    def step(model, optimizer, images, labels, flip, times, noise):
        x = to_model_range(images)
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)  # the shapes are left-right symmetric
        x = blur(x, times) + noise  # robust to the blur and grain of generated images

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        pick = rng.integers(0, len(train.images), 64)
        noise = rng.normal(0, 1, (64, 1, 1, 1)) * rng.uniform(0, 0.1, (64, 1, 1, 1)) * \
            rng.normal(0, 1, (64, resolution, resolution, 3))
        step(model, optimizer, train.images[pick], train.labels[pick], rng.random(64) < 0.5, rng.integers(0, 3, 64),
             noise.astype(np.float32))
    graphdef, state = nnx.split(model)
    probabilities = jax.jit(lambda images: jax.nn.softmax(nnx.merge(graphdef, state)(to_model_range(images))))
    judge = ShapeClassifier(probabilities, 0.0)
    judge.test_accuracy = float((judge.predict(test.images) == test.labels).mean())
    log(f"shape classifier: {judge.test_accuracy:.1%} of {len(test.images)} held-out real shapes right")
    return judge
