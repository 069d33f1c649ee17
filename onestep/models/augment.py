"""Differentiable augmentation of a discriminator's inputs (DiffAugment; Zhao et al., NeurIPS 2020): the same random
transform family on real and generated samples, drawn independently per sample, differentiable w.r.t. the sample so
that the generator trains through it. With few real images it keeps the discriminator from memorising them.

The ops and their strengths follow the official DiffAugment-pytorch (`DiffAugment(x, policy)`): `translation` shifts
each sample by up to 1/8 of its height and width, filling with zeros; `cutout` zeroes one square of half the height
and width centred anywhere in the sample; `color` adds a brightness offset U[-0.5, 0.5), scales the deviation from the
channel mean by U[0, 2) (saturation) and from the sample mean by U[0.5, 1.5) (contrast).

They act on whatever tensor the discriminator reads: pixels in [-1, 1] (zero is mid-grey), or a latent model's
latents (zero is near the latents' mean; `color` then mixes latent channels, not colours).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


TRANSLATION_RATIO = 0.125  # the official shift: up to 1/8 of the size
CUTOUT_RATIO = 0.5  # the official square: half the size


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped to broadcast over (C, H, W)."""
    return torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)


def color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, saturation and contrast, each with its own draw per sample (DiffAugment's `color`)."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def translation(x: torch.Tensor, generator: torch.Generator | None = None,
                ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i - dy_b, j - dx_b] (zero where that falls outside), with integer shifts
    dy_b ~ U{-round(ratio H), ..., round(ratio H)} and dx_b likewise over W."""
    batch, channels, height, width = x.shape
    max_dy, max_dx = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (batch, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (batch, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1) - dy  # (B, H, 1): the source row of each row
    cols = torch.arange(width, device=x.device).view(1, 1, width) - dx  # (B, 1, W)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # (B, H, W)
    source = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).view(batch, 1, height * width)
    moved = x.flatten(2).gather(2, source.expand(batch, channels, height * width)).view_as(x)
    return moved * inside.unsqueeze(1).to(x.dtype)


def cutout(x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero the rows [cy - h // 2, cy - h // 2 + h) x the columns [cx - w // 2, cx - w // 2 + w) of each sample
    (cut at the borders), h = round(ratio H), w = round(ratio W), the centre (cy, cx) uniform over the sample
    (DiffAugment's offsets: cy in [0, H] for an even h, [0, H) for an odd one)."""
    batch, _, height, width = x.shape
    size_y, size_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    cy = torch.randint(0, height + (1 - size_y % 2), (batch, 1, 1), generator=generator, device=x.device)
    cx = torch.randint(0, width + (1 - size_x % 2), (batch, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1) - (cy - size_y // 2)
    cols = torch.arange(width, device=x.device).view(1, 1, width) - (cx - size_x // 2)
    cut = (rows >= 0) & (rows < size_y) & (cols >= 0) & (cols < size_x)
    return x * (~cut).unsqueeze(1).to(x.dtype)


OPS = {"color": color, "translation": translation, "cutout": cutout}


def augment_ops(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ops of a policy: a comma-separated string ("translation,cutout") or a list; empty or None = none."""
    if spec is None:
        return ()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    ops = tuple(str(name).strip() for name in names if str(name).strip())
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(OPS)}")
    return ops


def diff_augment(x: torch.Tensor, ops: str | Sequence[str] | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) with the policy's ops applied in order, each drawn independently per sample; x itself when
    the policy is empty."""
    for op in augment_ops(ops):
        x = OPS[op](x, generator)
    return x
