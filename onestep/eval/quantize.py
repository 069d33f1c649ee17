"""Float images in [-1, 1] <-> uint8, rounded and clamped (never truncated, never wrapped around)."""

from __future__ import annotations

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 0..255: `((x + 1) * 127.5).round().clamp(0, 255)`; out-of-range values saturate.

    Raises:
        ValueError: when `x` holds NaNs (they have no pixel value; a diverged model should not score as black).
    """
    x = x.detach()
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError("to_uint8: images contain NaN")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 to float32 in [-1, 1] (the exact inverse of `to_uint8` on its outputs)."""
    return x.float() / 127.5 - 1.0
