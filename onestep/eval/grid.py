"""Sample grids as PNG files (tiny images upscaled with nearest neighbour), written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from onestep.files import atomic_file


def _to_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or len(array) == 0:
        raise ValueError(f"save_grid needs a non-empty uint8 (N, C, H, W) or (N, H, W, C) batch (see to_uint8), "
                         f"got {array.dtype} {array.shape}")
    if array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    elif array.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got shape {array.shape}")
    return array


def grid_array(images: torch.Tensor | np.ndarray, nrow: int | None = None, scale: int | None = None,
               padding: int = 2, pad_value: int = 128) -> np.ndarray:
    """uint8 images as one uint8 (H, W, C) grid, `nrow` images per row (default: a square-ish grid).

    Args:
        images: uint8 (N, C, H, W) or (N, H, W, C), C in {1, 3}; channel-first wins when both would fit.
        nrow: images per row; default ceil(sqrt(N)).
        scale: nearest-neighbour upscaling factor; default enough to make each image about 64 pixels wide.
        padding: pixels between and around the images.
        pad_value: gray level of the padding.
    """
    array = _to_nhwc(images)
    n, h, w, c = array.shape
    scale = scale or max(1, 64 // max(h, w))
    array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i, image in enumerate(array):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        canvas[y:y + h, x:x + w] = image
    return canvas


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None,
              scale: int | None = None, padding: int = 2, pad_value: int = 128) -> Path:
    """Write uint8 images as one PNG grid (see `grid_array` for the arguments); parent folders are created and the
    file appears complete or not at all."""
    from PIL import Image

    canvas = grid_array(images, nrow, scale, padding, pad_value)
    with atomic_file(path) as f:
        Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(f, format="PNG")
    return Path(path)
