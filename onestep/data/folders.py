"""Image folders (PNG/JPEG) as tensors in [-1, 1], all of one size, with one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onestep.errors import UserInputError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image_folder(path: Path, channels: int | None = None) -> torch.Tensor:
    """All images under `path` as (N, C, H, W) float32 in [-1, 1]; C is 1 for grayscale folders unless given."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise UserInputError(f"image folder not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays, size = [], None
    for file in files:
        try:
            with Image.open(file) as img:
                mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if img.mode in ("L", "1", "I;16") else "RGB")
                array = np.asarray(img.convert(mode), dtype=np.float32)
        except (UnidentifiedImageError, OSError) as err:
            raise UserInputError(f"cannot read image {file}: {err}") from None
        array = array[..., None] if array.ndim == 2 else array
        if size is None:
            size = array.shape
            channels = array.shape[-1]
        elif array.shape != size:
            raise UserInputError(f"image {file} is {array.shape[1]}x{array.shape[0]}, others are {size[1]}x{size[0]}")
        arrays.append(array)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return images / 127.5 - 1.0
