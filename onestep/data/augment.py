"""Augmentation of the shipped evaluators' training images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Move each image by a random whole number of pixels in [-max_shift, max_shift] per axis, padding with -1."""
    n, c, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def pixel_noise(x: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """Add Gaussian noise of `std` to every pixel, clamped back to [-1, 1] (the range of generated images)."""
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(-1.0, 1.0)
