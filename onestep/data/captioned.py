"""Captioned image datasets through Hugging Face `datasets`: an imagefolder, a dataset saved to disk, or a cached one.

An imagefolder follows the diffusers text-to-image examples: image files plus a `metadata.jsonl` whose lines are
`{"file_name": "0001.png", "text": "a photo of ..."}`. Rows are Arrow tables memory-mapped from disk; images stay
files (local datasets) or bytes in Arrow (Hub datasets) and are decoded only when a batch needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onestep.errors import UserInputError


@dataclass
class Columns:
    """Which dataset columns hold the image, its caption and its class label (None: the dataset has none)."""

    image: str
    caption: str | None = None
    label: str | None = None


def open_dataset(name: str, image_dir: str | None, dataset: str | None, split: str = "train"):
    """The rows of `data.name` image_folder (`image_dir`) or dataset (`dataset`: a `save_to_disk` folder, or a
    name that `datasets.load_dataset` finds in the local cache; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE respected)."""
    import datasets

    datasets.disable_progress_bars()
    if name == "image_folder":
        if not image_dir:
            raise UserInputError("data.name is image_folder but data.image_dir is not set")
        if not Path(image_dir).is_dir():
            raise UserInputError(f"image folder not found: {image_dir}")
        try:
            return datasets.load_dataset("imagefolder", data_dir=image_dir, split=split)
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as err:
            raise UserInputError(f"image folder {image_dir}: {_first_line(err)}") from None
    if not dataset:
        raise UserInputError("data.name is dataset but data.dataset is not set (a saved folder or a dataset name)")
    try:
        if any((Path(dataset) / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
            rows = datasets.load_from_disk(dataset)
            return rows[split] if isinstance(rows, datasets.DatasetDict) else rows
        return datasets.load_dataset(dataset, split=split)
    except (ValueError, FileNotFoundError, KeyError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserInputError(f"dataset {dataset} (split {split}): {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def find_columns(rows, image: str, caption: str | None, label: str | None, need_caption: bool) -> Columns:
    """The columns a run reads; a named column the rows lack is an error (a caption column only if captions are
    needed: a text teacher's real images keep their own captions)."""
    names = list(rows.column_names)
    if image not in names:
        raise UserInputError(f"data.image_column {image!r} is not a column of the dataset (columns: "
                             f"{', '.join(names)})")
    if need_caption and (caption is None or caption not in names):
        raise UserInputError(f"data.caption_column {caption!r} is not a column of the dataset (columns: "
                             f"{', '.join(names)}); a text teacher needs each image's caption (an imagefolder "
                             "gives them in metadata.jsonl)")
    return Columns(image, caption if need_caption else None, label if label in names else None)


def captions_of(rows, column: str) -> list[str]:
    """The non-empty captions, in row order (the prompts that data-free methods draw)."""
    captions = [c for c in rows[column] if c and c.strip()]
    if not captions:
        raise UserInputError(f"data.caption_column {column!r} holds no non-empty captions")
    return [c.strip() for c in captions]
