"""Coloured 32x32 digits with captions: the data of the miniature text-to-image teacher (`data.name: digits_t2i`).

Regenerable exactly from scikit-learn's digits (issue 16 fixes it):
- intensity v = pixel / 16 (8x8, values 0..16), upsampled to 32x32 bilinearly (align_corners=False);
- RGB = v * colour for colour in red (1,0,0), green (0,1,0), blue (0,0,1), yellow (1,1,0), on black:
  every image in every colour, 4 x 1797 = 7188 images, colour-major (index = colour * 1797 + digit image);
- one caption per image. With the colour named: "a {colour} {word}", "the number {word} in {colour}" or
  "{word}, {colour}"; without it (one caption in five): "a {word}" or "the number {word}".
  Which captions name the colour and which template each uses is drawn from `numpy.random.default_rng(CAPTION_SEED)`:
  first `integers(0, 5, N) == 0` marks the uncoloured captions, then `integers(0, 3, N)` picks the coloured
  template and `integers(0, 2, N)` the uncoloured one (each read only where it applies).
Images are returned in [-1, 1], as every onestep data set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch


COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
COLOUR_NAMES = tuple(COLOURS)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RESOLUTION = 32
MAX_TOKENS = 16  # the tokenizer's model_max_length: the longest caption is 7 tokens with <|startoftext|> and EOS
CAPTION_SEED = 0
COLOURED_TEMPLATES = ("a {colour} {word}", "the number {word} in {colour}", "{word}, {colour}")
UNCOLOURED_TEMPLATES = ("a {word}", "the number {word}")


@dataclass
class CaptionedDigits:
    """The data set: images (N, 3, 32, 32) in [-1, 1], digit labels (N,), colour indices (N,) into COLOUR_NAMES,
    and captions (N strings)."""

    images: torch.Tensor
    digits: torch.Tensor
    colours: torch.Tensor
    captions: list[str]


def coloured_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (7188, 3, 32, 32) in [-1, 1], digit labels and colour indices, colour-major."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    v = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    v = torch.nn.functional.interpolate(v, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    palette = torch.tensor(list(COLOURS.values()))[:, None, :, None, None]  # (4, 1, 3, 1, 1)
    images = (v[None] * palette).flatten(0, 1)  # colour-major
    digits = torch.from_numpy(bunch.target.astype(np.int64)).repeat(len(COLOURS))
    colours = torch.arange(len(COLOURS)).repeat_interleave(v.shape[0])
    return images * 2.0 - 1.0, digits, colours


def make_captions(digits: np.ndarray, colours: np.ndarray, seed: int = CAPTION_SEED) -> list[str]:
    """One caption per image, drawn as the module docstring fixes it."""
    rng = np.random.default_rng(seed)
    n = len(digits)
    uncoloured = rng.integers(0, 5, n) == 0
    coloured_template, uncoloured_template = rng.integers(0, 3, n), rng.integers(0, 2, n)
    captions = []
    for i in range(n):
        word, colour = WORDS[int(digits[i])], COLOUR_NAMES[int(colours[i])]
        template = (UNCOLOURED_TEMPLATES[uncoloured_template[i]] if uncoloured[i]
                    else COLOURED_TEMPLATES[coloured_template[i]])
        captions.append(template.format(word=word, colour=colour))
    return captions


def load_digits_t2i() -> CaptionedDigits:
    images, digits, colours = coloured_digits()
    return CaptionedDigits(images, digits, colours, make_captions(digits.numpy(), colours.numpy()))


_WORD = re.compile(r"[a-z]+")


def parse_caption(caption: str) -> tuple[int | None, int | None]:
    """(digit, colour index) a caption asks for; None where it names none (the colour of an uncoloured prompt)."""
    tokens = _WORD.findall(caption.lower())
    digit = next((WORDS.index(t) for t in tokens if t in WORDS), None)
    colour = next((COLOUR_NAMES.index(t) for t in tokens if t in COLOURS), None)
    return digit, colour


def caption_vocabulary() -> list[str]:
    """Every word and punctuation mark the captions use (what the tokenizer must cover)."""
    words = {w for template in COLOURED_TEMPLATES + UNCOLOURED_TEMPLATES
             for w in re.findall(r"[a-z]+|[^\sa-z{}]", re.sub(r"\{\w+\}", " ", template))}
    return sorted(words | set(WORDS) | set(COLOUR_NAMES))


def digits_t2i_tokenizer():
    """The CLIPTokenizer of the digits-t2i teacher: every caption word is one token."""
    from onestep.data.caption_tokenizer import caption_tokenizer

    return caption_tokenizer(caption_vocabulary(), MAX_TOKENS)


def eval_prompts(n: int = 1000) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The evaluation prompt set: n/2 coloured prompts (digit i % 10, colour (i // 10) % 4, template (i // 40) % 3)
    and n/2 uncoloured ones (digit i % 10, template (i // 10) % 2); their digits and colour indices (-1: none).

    Half uncoloured (not the data's one in five) so that colour balance is measured on enough samples; digits and
    colours are still uniform, as in the real data that FD-t2i compares with."""
    prompts, digits, colours = [], [], []
    for i in range(n // 2):
        word, colour = WORDS[i % 10], (i // 10) % 4
        prompts.append(COLOURED_TEMPLATES[(i // 40) % 3].format(word=word, colour=COLOUR_NAMES[colour]))
        digits.append(i % 10)
        colours.append(colour)
    for i in range(n - n // 2):
        prompts.append(UNCOLOURED_TEMPLATES[(i // 10) % 2].format(word=WORDS[i % 10]))
        digits.append(i % 10)
        colours.append(-1)
    return prompts, torch.tensor(digits), torch.tensor(colours)


def validation_prompts() -> list[str]:
    """The distillation runs' sample-grid rows: four coloured prompts, then the same digits uncoloured (whose colours
    should vary along the row)."""
    return ["a red seven", "a green two", "a blue four", "a yellow nine", "a seven", "a two", "a four", "a nine"]


def grid_prompts() -> list[str]:
    """Sample-grid prompts, one row per digit: "a {colour} {word}" for the four colours, then "a {word}" four times."""
    return [p for word in WORDS for p in [f"a {c} {word}" for c in COLOUR_NAMES] + [f"a {word}"] * 4]
