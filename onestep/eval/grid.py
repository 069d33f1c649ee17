"""Sample grids as PNG files (tiny images upscaled with nearest neighbour), written atomically."""

from __future__ import annotations

import math
import string
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
               padding: int = 2, pad_value: int = 128, labels: list[str] | None = None) -> np.ndarray:
    """uint8 images as one uint8 (H, W, C) grid, `nrow` images per row (default: a square-ish grid).

    Args:
        images: uint8 (N, C, H, W) or (N, H, W, C), C in {1, 3}; channel-first wins when both would fit.
        nrow: images per row; default ceil(sqrt(N)).
        scale: nearest-neighbour upscaling factor; default enough to make each image about 64 pixels wide.
        padding: pixels between and around the images.
        pad_value: gray level of the padding.
        labels: one text per image (its prompt), written under it (wrapped, at most LABEL_LINES lines).
    """
    array = _to_nhwc(images)
    n, h, w, c = array.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"save_grid got {len(labels)} labels for {n} images")
    scale = scale or max(1, 64 // max(h, w))
    array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    lines = _wrapped(labels, w) if labels is not None else None
    label_h = LINE_HEIGHT * max(map(len, lines)) if lines else 0
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    cell_h = h + label_h
    canvas = np.full((rows * (cell_h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    corners = [(padding + (i // nrow) * (cell_h + padding), padding + (i % nrow) * (w + padding)) for i in range(n)]
    for (y, x), image in zip(corners, array, strict=True):
        canvas[y:y + h, x:x + w] = image
        canvas[y + h:y + cell_h, x:x + w] = 255
    return _write_labels(canvas, lines, corners, h) if label_h else canvas


LABEL_LINES = 3
LINE_HEIGHT = 12


def _wrapped(labels: list[str], width: int) -> list[list[str]]:
    """Each label wrapped to lines that fit `width` pixels in PIL's default font."""
    import textwrap

    from PIL import ImageFont

    font = ImageFont.load_default()
    chars = max(1, int(width // (font.getlength(string.ascii_lowercase) / 26)) - 1)
    return [textwrap.wrap(str(label), chars, max_lines=LABEL_LINES, placeholder="..") or [""] for label in labels]


def _write_labels(canvas: np.ndarray, lines: list[list[str]], corners: list[tuple[int, int]], h: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    draw = ImageDraw.Draw(image)
    for (y, x), label in zip(corners, lines, strict=True):
        for k, line in enumerate(label):
            draw.text((x + 1, y + h + k * LINE_HEIGHT), line, fill=0 if image.mode == "L" else (0, 0, 0), font=font)
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None,
              scale: int | None = None, padding: int = 2, pad_value: int = 128,
              labels: list[str] | None = None) -> Path:
    """Write uint8 images as one PNG grid (see `grid_array` for the arguments; `labels`: each image's prompt, written
    under it); parent folders are created and the file appears complete or not at all."""
    from PIL import Image

    canvas = grid_array(images, nrow, scale, padding, pad_value, labels)
    with atomic_file(path) as f:
        Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(f, format="PNG")
    return Path(path)
