"""Pixel ranges and pictures: uint8 images <-> the model's [-1, 1], and sample grids.

The two conversions are diffusers' own: training feeds `Normalize([0.5], [0.5])(ToTensor()(image))`,
pipelines return `(x / 2 + 0.5).clamp(0, 1)`. They work on numpy and JAX arrays alike.
"""

from __future__ import annotations

import math

import numpy as np


def to_model_range(images_uint8):
    """uint8 pixels -> float32 in [-1, 1], as torchvision ToTensor + Normalize([0.5], [0.5])."""
    return (images_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5


def to_unit_range(samples):
    """A model-range sample -> [0, 1], diffusers' pipeline output: (x / 2 + 0.5).clip(0, 1)."""
    return (samples / 2 + 0.5).clip(0, 1)


def to_uint8(images_unit) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return (np.clip(np.asarray(images_unit), 0, 1) * 255).round().astype(np.uint8)


def image_grid(images, columns: int | None = None):
    """A PIL grid of float [0, 1] or uint8 NHWC images, 2-pixel white gutters."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * h + (rows - 1) * 2, columns * w + (columns - 1) * 2, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, col * (w + 2):col * (w + 2) + w] = image
    return Image.fromarray(grid[..., 0] if c == 1 else grid)
