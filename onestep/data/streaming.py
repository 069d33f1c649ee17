"""Real images streamed from a dataset: a torch DataLoader with workers, one shard per process, bounded memory.

Each batch holds images at the teacher's resolution (resized on the short side, cropped, randomly flipped) or, with
a latent cache, the cached VAE moments; each image comes with its own condition (caption or class label).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from onestep.data.captioned import Columns
from onestep.errors import UserInputError
from onestep.models.conditioning import Condition


def prepare_image(image, resolution: int, channels: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    """A PIL image as (C, resolution, resolution) float32 in [-1, 1]: short side resized to `resolution` (bilinear,
    as the diffusers text-to-image examples), then a center or random crop and a random horizontal flip."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(torch.randint(0, size[0] - resolution + 1, ()))
        top = int(torch.randint(0, size[1] - resolution + 1, ()))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x.flip(-1) if random_flip and bool(torch.rand(()) < 0.5) else x


def open_image(value):
    """An image cell as a PIL image: a PIL image already, or datasets' undecoded {"path", "bytes"}."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


class DecodeImages:
    """Row -> image tensor, decoded and transformed in the loader's worker."""

    def __init__(self, resolution: int, channels: int, center_crop: bool = True, random_flip: bool = True):
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip = center_crop, random_flip

    def __call__(self, index: int, cell) -> torch.Tensor:
        with open_image(cell) as image:
            return prepare_image(image, self.resolution, self.channels, self.center_crop, self.random_flip)


def usable_workers(requested: int) -> int:
    """DataLoader worker processes: as many as asked, but no more than the CPU cores this process may use (a recipe's
    num_workers: 8 on a 2-core machine would only make the processes fight, and torch warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cores)


class Rows(torch.utils.data.Dataset):
    """The selected rows of a `datasets` table: {"x": tensor, "caption" or "label"}, or {"skipped": what} for an
    image that cannot be read (it is skipped, and counted, rather than failing a long run; see docs/data.md)."""

    def __init__(self, table, columns: Columns, load: Callable, indices: np.ndarray | None = None):
        import datasets

        keep = [c for c in (columns.image, columns.caption, columns.label) if c is not None]
        table = table.select_columns(keep)
        if isinstance(table.features[columns.image], datasets.Image):
            table = table.cast_column(columns.image, datasets.Image(decode=False))  # decoded here, in the worker
        self.table, self.columns, self.load = table, columns, load
        self.indices = np.arange(len(table)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, indices: np.ndarray) -> Rows:
        """A view on some of these rows (indices into this view)."""
        view = Rows.__new__(Rows)
        view.table, view.columns, view.load, view.indices = self.table, self.columns, self.load, self.indices[indices]
        return view

    def column(self, name: str) -> list:
        """One column's values over these rows (captions or labels only: no image is read)."""
        return list(self.table.select_columns([name]).select(self.indices)[name])

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        index = int(self.indices[i])
        row = self.table[index]
        try:
            item = {"x": self.load(index, row[self.columns.image])}
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL: missing, broken, alien
            cell = row[self.columns.image]
            return {"skipped": f"{cell.get('path') if isinstance(cell, dict) else index}: {err}"}
        if self.columns.caption is not None:
            item["caption"] = row[self.columns.caption] or ""
        if self.columns.label is not None:
            item["label"] = int(row[self.columns.label])
        return item


def collate(items: list[dict]) -> dict:
    good = [item for item in items if "x" in item]
    batch: dict = {"skipped": [item["skipped"] for item in items if "skipped" in item]}
    if good:
        batch["x"] = torch.stack([item["x"] for item in good])
        if "caption" in good[0]:
            batch["caption"] = [item["caption"] for item in good]
        if "label" in good[0]:
            batch["label"] = torch.tensor([item["label"] for item in good])
    return batch


class StreamingImages:
    """Real images in model space with their own conditions, drawn batch by batch from a shuffled DataLoader.

    Args:
        rows: the dataset rows (images or cached latents, with captions or labels).
        batch_size: images per batch (per process).
        to_model_space: pixels -> model space (the teacher's VAE encoder) or cached moments -> latents.
        caption_condition: captions -> Condition (the teacher's prompt encoding).
        unlabeled: n -> the null Condition, for rows without caption or label.
        num_workers: DataLoader worker processes (0: decode in the training process).
        seed: the shuffling seed (each epoch reshuffles; each process reads its own shard).
    """

    def __init__(self, rows: Rows, batch_size: int, to_model_space: Callable[[torch.Tensor], torch.Tensor],
                 caption_condition: Callable[[list[str]], Condition] | None = None,
                 unlabeled: Callable[[int], Condition] | None = None, num_workers: int = 0, seed: int = 0,
                 source: str = "the dataset"):
        if len(rows) == 0:
            raise ValueError(f"no images in {source}")
        self.rows, self.batch_size, self.to_model_space = rows, batch_size, to_model_space
        self.caption_condition, self.unlabeled = caption_condition, unlabeled
        self.num_workers, self.seed, self.source = usable_workers(num_workers), seed, source
        self.skipped: set[str] = set()
        self._batches: Iterator[dict] | None = None
        self._buffer: list[dict] = []
        self._position = (0, 0)  # (epoch, loader batches of it taken into the buffer): saved in checkpoints

    @property
    def conditioned(self) -> bool:
        """Whether each image carries its own condition (caption or label)."""
        return self.rows.columns.caption is not None or self.rows.columns.label is not None

    def subset(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> StreamingImages:
        """Only the images of these classes, or whose captions are among these prompts (an MSD student's slice)."""
        if classes is not None and self.rows.columns.label is not None:
            keep = np.isin(np.asarray(self.rows.column(self.rows.columns.label)), list(classes))
        elif prompts is not None and self.rows.columns.caption is not None:
            own = set(prompts)
            keep = np.array([(c or "").strip() in own for c in self.rows.column(self.rows.columns.caption)])
        else:
            return self
        return StreamingImages(self.rows.select(np.flatnonzero(keep)), self.batch_size, self.to_model_space,
                               self.caption_condition, self.unlabeled, self.num_workers, self.seed,
                               f"{self.source} (this slice)")

    def _loader(self) -> Iterator[dict]:
        from onestep.training.trainer import process_state

        state = process_state()
        sampler = _Resuming(torch.utils.data.DistributedSampler(self.rows, num_replicas=state.num_processes,
                                                                rank=state.process_index, shuffle=True,
                                                                seed=self.seed))
        # its own generator: creating a loader iterator draws a seed, which must not come from the training's
        # random numbers (a resumed run creates one where the uninterrupted run did not)
        loader = torch.utils.data.DataLoader(self.rows, batch_size=self.batch_size, sampler=sampler,
                                             num_workers=self.num_workers, collate_fn=collate,
                                             persistent_workers=self.num_workers > 0,
                                             generator=torch.Generator().manual_seed(self.seed))
        epoch, taken = self._position
        while True:
            sampler.inner.set_epoch(epoch)
            sampler.skip = taken * self.batch_size
            produced = taken
            for batch in loader:
                self._report(batch["skipped"])
                taken += 1
                self._position = (epoch, taken)
                if "x" in batch:
                    produced += len(batch["x"])
                    yield batch
            if not produced:
                raise UserInputError(f"no readable image in {self.source} ({len(self.skipped)} skipped)")
            epoch, taken = epoch + 1, 0

    def _report(self, skipped: list[str]) -> None:
        for what in skipped:
            if what not in self.skipped:
                self.skipped.add(what)
                print(f"onestep: skipped an unreadable image ({len(self.skipped)} so far): {what}", file=sys.stderr)

    def next_batch(self, n: int) -> dict:
        """The next n rows of the stream (batches are split or joined as needed)."""
        if self._batches is None:
            self._batches = self._loader()
        have = sum(len(b["x"]) for b in self._buffer)
        while have < n:
            self._buffer.append(next(self._batches))
            have += len(self._buffer[-1]["x"])
        joined = {"x": torch.cat([b["x"] for b in self._buffer])}
        for key in ("caption", "label"):
            if key in self._buffer[0]:
                values = [v for b in self._buffer for v in b[key]]
                joined[key] = values if key == "caption" else torch.stack(values)
        rest = {k: v[n:] for k, v in joined.items()}
        self._buffer = [rest] if len(rest["x"]) else []
        return {k: v[:n] for k, v in joined.items()}

    def state_dict(self) -> dict:
        """Where the stream is (saved in checkpoints): a resumed run reads on from the same row. With
        `num_workers: 0` it also draws the same flips (from the restored random numbers); workers draw their own."""
        return {"epoch": self._position[0], "batches": self._position[1], "buffer": self._buffer}

    def load_state_dict(self, state: dict) -> None:
        self._position, self._buffer = (int(state["epoch"]), int(state["batches"])), list(state["buffer"])
        self._batches = None

    def sample(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, Condition]:
        """n real images in model space and their Condition (their captions' embeddings, or their labels)."""
        batch = self.next_batch(n)
        # contiguous: the VAE may return channels-last latents, and randn_like would then draw the noise in another
        # order than for the same latents read from the cache
        x = self.to_model_space(batch["x"].to(device)).float().contiguous()
        if "caption" in batch:
            return x, self.caption_condition(batch["caption"]).to(device)
        if "label" in batch:
            return x, Condition(class_labels=batch["label"].to(device))
        return x, (self.unlabeled(n).to(device) if self.unlabeled is not None else Condition())


class _Resuming(torch.utils.data.Sampler):
    """A sampler that leaves out the first `skip` indices of its next pass (a resumed stream's position)."""

    def __init__(self, inner: torch.utils.data.Sampler):
        self.inner, self.skip = inner, 0

    def __iter__(self) -> Iterator[int]:
        indices, self.skip = list(self.inner)[self.skip:], 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self.inner) - self.skip
