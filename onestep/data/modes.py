"""Generated image sets with known modes of unequal weight and sub-modes inside them (the mode-coverage benchmark).

Each 8x8 RGB image (the digits' size, so the digits recipes cost the same here) is a black background with one
3x3 square. Its colour is the *mode*, the quadrant it sits in the *sub-mode*. Within a sub-mode the square moves by
one pixel (offset 0 or 1 in its 4x4 quadrant on each axis) and its brightness varies continuously (0.75 to 1), so a
teacher must model a distribution, not memorise 16 pictures. Two sets (`MODE_SETS`):

- `squares`: red / green / blue / white at 0.5 / 0.3 / 0.15 / 0.05, the four quadrants equally likely in each;
- `secondaries`: yellow / cyan / magenta at 0.6 / 0.3 / 0.1 (two channels lit each, so a blend of two modes is
  visibly off-mode), quadrants at 0.4 / 0.3 / 0.2 / 0.1 in every mode: unequal sub-modes, the rarest (magenta,
  bottom-right) 1% of the data, test whether a student keeps the weights inside a mode, not only across modes.

The counts are exact (stratified, not drawn): every realised share equals its nominal weight up to rounding.
`onestep.eval.modes` decides the mode and sub-mode of any image by rule from these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onestep.errors import UserInputError


RESOLUTION = 8
SIDE = 3  # the square's side in pixels
OFFSETS = (0, 1)  # the square's top-left corner inside its 4x4 quadrant, per axis
BRIGHTNESS = (0.75, 1.0)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class ModeSet:
    """Modes (name -> which RGB channels are lit, weight) and each quadrant's share inside every mode."""

    modes: dict[str, tuple[tuple[int, int, int], float]]
    quadrant_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)

    @property
    def names(self) -> list[str]:
        return list(self.modes)

    @property
    def channels(self) -> np.ndarray:
        """(modes, 3) 0/1: the channels each mode lights."""
        return np.array([channels for channels, _ in self.modes.values()])

    def mode_weights(self) -> np.ndarray:
        return np.array([w for _, w in self.modes.values()])

    def submode_weights(self) -> np.ndarray:
        """(modes, quadrants): the data's share of each sub-mode."""
        return np.outer(self.mode_weights(), self.quadrant_weights)


MODE_SETS: dict[str, ModeSet] = {
    "squares": ModeSet({"red": ((1, 0, 0), 0.5), "green": ((0, 1, 0), 0.3), "blue": ((0, 0, 1), 0.15),
                        "white": ((1, 1, 1), 0.05)}),
    "secondaries": ModeSet({"yellow": ((1, 1, 0), 0.6), "cyan": ((0, 1, 1), 0.3), "magenta": ((1, 0, 1), 0.1)},
                           quadrant_weights=(0.4, 0.3, 0.2, 0.1)),
}
SQUARES = MODE_SETS["squares"]  # the first set, every function's default


def mode_set(name: str) -> ModeSet:
    if name not in MODE_SETS:
        raise UserInputError(f"unknown mode set {name!r}; choose one of {sorted(MODE_SETS)}")
    return MODE_SETS[name]


def draw_square(channels: np.ndarray, quadrant: int, offset: tuple[int, int], brightness: float) -> np.ndarray:
    """One uint8 (8, 8, 3) image: `channels` lit at `brightness`, in `quadrant` at `offset` (row, column)."""
    image = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    top = (quadrant // 2) * (RESOLUTION // 2) + offset[0]
    left = (quadrant % 2) * (RESOLUTION // 2) + offset[1]
    colour = np.round(255 * brightness * np.asarray(channels, np.float64)).astype(np.uint8)
    image[top:top + SIDE, left:left + SIDE] = colour
    return image


def make_modes_images(num_images: int, seed: int = 0, modes_of: ModeSet = SQUARES
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images (N, 8, 8, 3) with their modes (N,) and quadrants (N,), in a seeded random order.

    Each sub-mode gets round(N * weight) images (the largest sub-mode absorbs the rounding), each with a random
    offset and brightness.
    """
    weights = modes_of.submode_weights().reshape(-1)
    counts = np.round(weights * num_images).astype(int)
    counts[weights.argmax()] += num_images - counts.sum()
    if (counts <= 0).any():
        raise UserInputError(f"{num_images} images are too few for every sub-mode (the smallest has weight "
                             f"{weights.min():g}); use at least {int(np.ceil(1 / weights.min()))}")
    cells = np.repeat(np.arange(len(weights)), counts)
    rng = np.random.default_rng(seed)
    cells = cells[rng.permutation(num_images)]
    modes, quadrants = cells // len(QUADRANTS), cells % len(QUADRANTS)
    offsets = rng.choice(OFFSETS, size=(num_images, 2))
    brightness = rng.uniform(*BRIGHTNESS, size=num_images)
    images = np.stack([draw_square(modes_of.channels[m], q, tuple(o), b)
                       for m, q, o, b in zip(modes, quadrants, offsets, brightness, strict=True)])
    return images, modes, quadrants


def write_modes_folder(folder: Path, num_images: int = 4000, seed: int = 0,
                       modes_of: ModeSet = SQUARES) -> Path:
    """The images as PNG files in `folder` (an imagefolder for `data.name: image_folder`); refuses a non-empty
    folder so nothing on disk is overwritten."""
    from PIL import Image

    from onestep.files import atomic_file

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserInputError(f"{folder} exists and is not an empty folder; choose a new one")
    images, _, _ = make_modes_images(num_images, seed, modes_of)
    for i, image in enumerate(images):
        with atomic_file(folder / f"{i:06d}.png") as f:
            Image.fromarray(image).save(f, format="PNG")
    return folder
