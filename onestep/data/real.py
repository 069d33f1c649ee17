"""A run's data, from its `data:` config: the real images (with their own conditions) and the prompts to draw.

`data.name`: `digits` (the embedded set, held in memory), `image_folder` (an imagefolder with metadata.jsonl) or
`dataset` (a saved or locally cached Hugging Face dataset), both streamed; `prompts` (no images: data-free methods).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from onestep.data.captioned import Columns, captions_of, find_columns, open_dataset
from onestep.data.conditions import RealImages
from onestep.data.streaming import DecodeImages, Rows, StreamingImages
from onestep.errors import UserInputError


DATA_NAMES = ("digits", "digits_t2i", "image_folder", "dataset", "prompts")


def image_size(teacher) -> tuple[int, int]:
    """(channels, pixels) of the images a teacher models: its VAE's input, or its UNet's sample for pixel models."""
    channels, size, _ = teacher.sample_shape
    if teacher.vae is None:
        return channels, size
    return teacher.vae.config.in_channels, size * 2 ** (len(teacher.vae.config.block_out_channels) - 1)


class DataSource:
    """The rows of a captioned dataset (opened once, read lazily) and how a teacher reads them."""

    def __init__(self, data, teacher):
        self.data, self.teacher = data, teacher
        self.table = open_dataset(data.name, data.image_dir, data.dataset, data.split)
        self.columns: Columns = find_columns(self.table, data.image_column, data.caption_column,
                                             data.label_column if teacher.num_classes else None,
                                             need_caption=teacher.is_text)
        self.channels, self.resolution = image_size(teacher)

    def label(self) -> str:
        return self.data.image_dir or self.data.dataset

    def captions(self) -> list[str]:
        return captions_of(self.table, self.columns.caption)

    def rows(self, center_crop: bool, random_flip: bool) -> Rows:
        return Rows(self.table, self.columns, DecodeImages(self.resolution, self.channels, center_crop, random_flip))

    def real(self, caption_condition, seed: int, cache_dir: Path | None) -> StreamingImages:
        """The stream of real images in the teacher's model space, each with its own caption or label."""
        data, teacher = self.data, self.teacher
        if cache_dir is None:
            rows, to_model_space = self.rows(data.center_crop, data.random_flip), teacher.encode
        else:
            rows, to_model_space = self._cached_rows(cache_dir), teacher.sample_latents
        try:
            return StreamingImages(rows, data.batch_size, to_model_space, caption_condition, teacher.unconditional,
                                   data.num_workers, seed, source=self.label())
        except ValueError as err:
            raise UserInputError(str(err)) from None

    def _cached_rows(self, cache_dir: Path) -> Rows:
        from onestep.data.latent_cache import CachedMoments, build_latent_cache
        from onestep.models.loading import DTYPES

        if self.teacher.vae is None:
            raise UserInputError("data.latent_cache needs a latent teacher (one with a VAE)")
        vae = self.teacher.vae
        settings = {"rows": len(self.table), "fingerprint": self.table._fingerprint, "resolution": self.resolution,
                    "dtype": self.data.latent_cache_dtype,
                    "vae": hashlib.sha256(json.dumps([float(p.double().sum()) for p in vae.parameters()])
                                          .encode()).hexdigest()[:16]}
        build_latent_cache(self.rows(center_crop=True, random_flip=False), self.teacher.encode_moments, cache_dir,
                           settings, self.data.batch_size, self.data.latent_cache_shard_size,
                           dtype=DTYPES[self.data.latent_cache_dtype],
                           num_workers=self.data.num_workers)
        cached = CachedMoments(cache_dir, self.data.random_flip)
        rows = Rows(self.table, self.columns, cached)
        return rows.select(cached.rows)


def real_images(data, teacher, caption_condition, seed: int = 0, cache_dir: Path | None = None,
                source: DataSource | None = None):
    """The run's real images (RealImages for digits, StreamingImages for datasets), or None for `prompts`."""
    if data.name == "digits":
        from onestep.data.digits import load_digits_tensors

        images, labels = load_digits_tensors()
        _check_size(teacher, images, "the digits")
        return RealImages(images, labels if teacher.num_classes else None,
                          encode=teacher.encode if teacher.vae is not None else None, unlabeled=teacher.unconditional)
    if data.name == "digits_t2i":  # coloured digits, each with its caption, in memory (32x32)
        from onestep.data.digits_t2i import load_digits_t2i

        digits = load_digits_t2i()
        _check_size(teacher, digits.images, "the coloured digits")
        return RealImages(digits.images, encode=teacher.encode if teacher.vae is not None else None,
                          unlabeled=teacher.unconditional, captions=digits.captions,
                          caption_condition=caption_condition)
    if data.name == "prompts":
        return None
    return (source or DataSource(data, teacher)).real(caption_condition, seed, cache_dir)


def _check_size(teacher, images, what: str) -> None:
    channels, size = image_size(teacher)
    if (channels, size, size) != tuple(images.shape[1:]):
        raise UserInputError(f"teacher works on {channels}x{size}x{size} images (C x H x W) but {what} are "
                             f"{images.shape[1]}x{images.shape[2]}x{images.shape[3]}")


def check_data_name(name: str) -> None:
    if name not in DATA_NAMES:
        raise UserInputError(f"data.name must be one of {', '.join(DATA_NAMES)}, got {name!r}")

