"""Which mode and sub-mode an image of a generated mode set (`onestep.data.modes`) shows, decided by rule, and how
a sampler's mode and sub-mode rates compare with its teacher's.

No learned classifier is involved, so the measurement cannot be fooled by features a student happens to match: an
image is on-mode only if it is one compact square of one of the modes' colours inside one quadrant; anything else
(two squares, a smear, a mixed colour such as yellow, nothing at all) is off-mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from onestep.data.modes import QUADRANTS, SIDE, SQUARES, ModeSet


LIT = 0.4  # a pixel is lit when its brightest channel exceeds this (squares are drawn at 0.75..1, background 0)
CHANNEL_ON, CHANNEL_OFF = 0.5, 0.25  # a lit region's mean channel value: on above, off below, ambiguous between
MIN_PIXELS, MAX_PIXELS = round(0.6 * SIDE**2), round(1.6 * SIDE**2)  # one square's lit pixels, soft edges allowed
MAX_EXTENT = SIDE + 1  # the lit pixels' bounding box, per axis
IN_QUADRANT = 0.85  # share of the lit pixels inside the square's quadrant
OFF_MODE = -1


def classify_modes(images: torch.Tensor, modes_of: ModeSet = SQUARES
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mode, quadrant) of each uint8 (N, 3, 8, 8) image in `modes_of`; both OFF_MODE (-1) where it fits no mode."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"classify_modes needs uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 255.0
    n, _, height, width = x.shape
    lit = x.amax(1) > LIT  # (N, H, W)
    count = lit.sum((1, 2))
    # the lit region's colour: which channels are on (> CHANNEL_ON) / off (< CHANNEL_OFF), on average
    colour = (x * lit[:, None]).sum((2, 3)) / count.clamp(min=1)[:, None]
    on, off = colour > CHANNEL_ON, colour < CHANNEL_OFF
    patterns = torch.from_numpy(modes_of.channels).bool()  # (modes, 3)
    matches = ((on[:, None] == patterns) & (on | off)[:, None]).all(-1)  # (N, modes)
    mode = torch.where(matches.any(1), matches.float().argmax(1), OFF_MODE)
    # compact: bounding box of the lit pixels
    rows, cols = lit.any(2), lit.any(1)

    def extent(mask: torch.Tensor) -> torch.Tensor:
        index = torch.arange(mask.shape[1])
        first = torch.where(mask, index, mask.shape[1]).amin(1)
        last = torch.where(mask, index, -1).amax(1)
        return last - first + 1

    compact = (extent(rows) <= MAX_EXTENT) & (extent(cols) <= MAX_EXTENT)
    # the quadrant holding (nearly) all lit pixels
    per_quadrant = lit.reshape(n, 2, height // 2, 2, width // 2).sum((2, 4)).reshape(n, 4)
    quadrant = per_quadrant.argmax(1)
    inside = per_quadrant.amax(1) >= IN_QUADRANT * count
    valid = (mode != OFF_MODE) & (count >= MIN_PIXELS) & (count <= MAX_PIXELS) & compact & inside
    return torch.where(valid, mode, OFF_MODE), torch.where(valid, quadrant, OFF_MODE)


@dataclass
class ModeCounts:
    """How many of `total` samples fell in each (mode, quadrant) cell of `modes_of`; the rest are off-mode."""

    cells: np.ndarray  # (modes, quadrants) int
    total: int
    modes_of: ModeSet

    @classmethod
    def of(cls, modes: torch.Tensor, quadrants: torch.Tensor, modes_of: ModeSet = SQUARES
           ) -> ModeCounts:
        cells = np.zeros((len(modes_of.modes), len(QUADRANTS)), np.int64)
        on = modes != OFF_MODE
        np.add.at(cells, (modes[on].numpy(), quadrants[on].numpy()), 1)
        return cls(cells, len(modes), modes_of)

    def __add__(self, other: ModeCounts) -> ModeCounts:
        if other.modes_of != self.modes_of:
            raise ValueError("cannot add counts of two different mode sets")
        return ModeCounts(self.cells + other.cells, self.total + other.total, self.modes_of)

    @property
    def mode_shares(self) -> np.ndarray:
        """Each mode's share of all samples (off-mode samples count in the total)."""
        return self.cells.sum(1) / self.total

    @property
    def submode_rates(self) -> np.ndarray:
        """(modes, quadrants): each sub-mode's share of all samples."""
        return self.cells / self.total

    @property
    def off_mode(self) -> float:
        return 1.0 - self.cells.sum() / self.total


def count_modes(images: torch.Tensor, modes_of: ModeSet = SQUARES) -> ModeCounts:
    return ModeCounts.of(*classify_modes(images, modes_of), modes_of)


def coverage(sample: ModeCounts, teacher: ModeCounts) -> dict:
    """Mode-weight error and sub-mode coverage of `sample` against `teacher`, each with its standard error.

    mode-weight error = max over modes |share - teacher share| (shares of all samples); its standard error is that
    of the worst mode's difference of two independent binomial shares. Sub-mode coverage = rate / teacher rate per
    sub-mode; the worst is the minimum, with the delta-method standard error of that ratio (sub-modes the teacher
    never drew have no ratio; with none drawn, the worst is None).
    """
    p, q = sample.mode_shares, teacher.mode_shares
    diff = np.abs(p - q)
    worst_mode = int(diff.argmax())
    se_mode = math.sqrt(p[worst_mode] * (1 - p[worst_mode]) / sample.total
                        + q[worst_mode] * (1 - q[worst_mode]) / teacher.total)
    rs, rt = sample.submode_rates, teacher.submode_rates
    names = sample.modes_of.names
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rt > 0, rs / rt, np.nan)  # undefined where the teacher never drew the sub-mode
    row = {"mode_shares": dict(zip(names, p.tolist(), strict=True)),
           "mode_weight_error": float(diff.max()), "mode_weight_error_se": se_mode, "worst_mode": names[worst_mode],
           "submode_ratio": {f"{names[i]}/{QUADRANTS[j]}": None if np.isnan(ratio[i, j]) else float(ratio[i, j])
                             for i in range(len(names)) for j in range(len(QUADRANTS))},
           "worst_submode": None, "worst_submode_ratio": None, "worst_submode_ratio_se": None,
           "off_mode": sample.off_mode, "num_samples": sample.total}
    if not np.isnan(ratio).all():
        m, k = np.unravel_index(int(np.nanargmin(ratio)), ratio.shape)
        se_sample = (1 - rs[m, k]) / (sample.total * rs[m, k]) if rs[m, k] > 0 else 0.0
        row.update(worst_submode=f"{names[m]}/{QUADRANTS[k]}", worst_submode_ratio=float(ratio[m, k]),
                   worst_submode_ratio_se=float(ratio[m, k] * math.sqrt(se_sample + (1 - rt[m, k])
                                                                        / (teacher.total * rt[m, k]))))
    return row
