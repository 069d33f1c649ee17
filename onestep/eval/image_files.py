"""Image folders for evaluation, streamed: uint8 batches of a few hundred images, never the whole folder in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from onestep.data.folders import IMAGE_SUFFIXES
from onestep.eval.features import EvalError
from onestep.files import files_digest


def image_files(path: Path) -> list[Path]:
    """The images under `path` (recursively, sorted); an EvalError when there is no such folder or no image."""
    if not path.is_dir():
        raise EvalError(f"image folder not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read(file: Path, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise EvalError(f"cannot read image {file}: {err}") from None
    return array[..., None] if array.ndim == 2 else array


def iter_image_batches(path: Path, channels: int, batch_size: int = 256,
                       size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """uint8 (n, channels, H, W) batches of the folder's images, in file order.

    Images of another size than the first (or than `size`, (H, W)) are an EvalError naming the file: a feature
    network resizes, but a folder of mixed sizes is most often a mistake.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    batch: list[np.ndarray] = []
    for file in image_files(path):
        array = _read(file, mode)
        if size is None:
            size = array.shape[:2]
        elif array.shape[:2] != tuple(size):
            raise EvalError(f"image {file} is {array.shape[1]}x{array.shape[0]}, others are {size[1]}x{size[0]}")
        batch.append(array)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def folder_digest(path: Path) -> str:
    """sha256 over the folder's image files (relative names and bytes): the content a statistics cache keys on."""
    return files_digest(path, image_files(path))
