"""A VAE latent cache: every image encoded once, its posterior moments stored in safetensors shards.

Stored are the moments (mean and log-variance, as diffusers' `DiagonalGaussianDistribution` holds them), not one
latent draw: training still samples a fresh latent from each image's posterior, exactly as on-the-fly encoding does
(EDM2 caches its latents the same way). Images are center-cropped once; the random flip is applied to the cached
moments (a horizontally flipped image has, to the VAE's accuracy, horizontally flipped latents).

A build killed midway goes on from its last complete shard: each shard is written atomically, then
`latents.partial.json` records the shards so far and how many rows they cover. The index records each shard's size,
and the cache is opened only if every shard has it (a truncated or missing shard is refused, never read).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from onestep.data.streaming import Rows, collate, usable_workers
from onestep.errors import UserInputError
from onestep.files import atomic_file, write_json_atomic


INDEX = "latents.json"  # written last: a folder without it is incomplete and is encoded again
PROGRESS = "latents.partial.json"  # a build under way: its complete shards, and the rows they cover


def build_latent_cache(rows: Rows, encode_moments: Callable[[torch.Tensor], torch.Tensor], out_dir: Path,
                       settings: dict, batch_size: int = 32, shard_size: int = 4096,
                       dtype: torch.dtype = torch.float16,
                       num_workers: int = 0) -> None:
    """Encode `rows` (decoded center-cropped, unflipped) into OUT_DIR/shard-NNNNN.safetensors + latents.json.

    An existing complete cache with the same `settings` is kept; one with other settings is refused.
    """
    index = out_dir / INDEX
    if index.is_file():
        recorded = json.loads(index.read_text())
        if recorded["settings"] != settings:
            raise UserInputError(f"{out_dir} holds a latent cache of another dataset, resolution or VAE "
                                 f"({recorded['settings']}); choose another data.latent_cache")
        if recorded.get("skipped"):
            print(f"onestep: the latent cache {out_dir} leaves out {len(recorded['skipped'])} unreadable image(s) "
                  f"(listed in its {INDEX})", file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".shard-*.tmp"):  # a shard being written when a build was killed
        leftover.unlink()
    done = {"settings": settings, "shard_size": shard_size, "shards": [], "bytes": {}, "skipped": [], "rows": 0}
    if (out_dir / PROGRESS).is_file():
        partial = json.loads((out_dir / PROGRESS).read_text())
        if all(partial.get(k) == done[k] for k in ("settings", "shard_size")):
            done = partial
    remaining = torch.utils.data.Subset(_Numbered(rows), range(done["rows"], len(rows)))
    # its own generator: the build must not move the random numbers that the networks built after it draw (a
    # resumed, or found complete, build would then start another run)
    loader = torch.utils.data.DataLoader(remaining, batch_size=batch_size,
                                         num_workers=usable_workers(num_workers),
                                         collate_fn=_collate_numbered, generator=torch.Generator())
    pending, read = {"moments": [], "rows": []}, done["rows"]

    def flush() -> None:
        name = f"shard-{len(done['shards']):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
        with atomic_file(out_dir / name) as f:
            f.write(save(tensors))
        done["shards"].append(name)
        done["bytes"][name] = (out_dir / name).stat().st_size
        done["rows"] = read
        write_json_atomic(out_dir / PROGRESS, done)
        pending["moments"], pending["rows"] = [], []

    for batch, numbers in tqdm(loader, desc="latent cache", initial=done["rows"] // batch_size,
                               total=-(-len(rows) // batch_size), dynamic_ncols=True):
        read += len(numbers) + len(batch["skipped"])
        for what in batch["skipped"]:  # none left out silently (docs/data.md)
            done["skipped"].append(what)
            print(f"onestep: latent cache: skipped an unreadable image ({len(done['skipped'])} so far): {what}",
                  file=sys.stderr)
        if "x" not in batch:
            continue
        pending["moments"].append(encode_moments(batch["x"]).to("cpu", dtype))
        pending["rows"].append(torch.as_tensor(rows.indices[numbers], dtype=torch.int64))
        if sum(len(r) for r in pending["rows"]) >= shard_size:
            flush()
    if pending["rows"]:
        flush()
    if not done["shards"]:
        raise UserInputError(f"no readable image to cache ({len(done['skipped'])} skipped)")
    write_json_atomic(index, {k: done[k] for k in ("settings", "shards", "bytes", "skipped")})
    (out_dir / PROGRESS).unlink()


class _Numbered(torch.utils.data.Dataset):
    """Rows with their position, so the cache knows which rows it holds (unreadable ones are left out)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[dict, int]:
        return self.rows[i], i


def _collate_numbered(items: list[tuple[dict, int]]) -> tuple[dict, list[int]]:
    return collate([item for item, _ in items]), [i for item, i in items if "x" in item]


class CachedMoments:
    """Row -> its cached VAE moments (2C, h, w), read from the memory-mapped shards; randomly flipped."""

    def __init__(self, cache_dir: Path, random_flip: bool = True):
        recorded = json.loads((cache_dir / INDEX).read_text())
        for name, size in recorded.get("bytes", {}).items():  # caches from before sizes were recorded: as they are
            found = (cache_dir / name).stat().st_size if (cache_dir / name).is_file() else None
            if found != size:
                raise UserInputError(f"latent cache {cache_dir} is damaged: {name} is "
                                     f"{'missing' if found is None else f'{found} bytes'}, {size} bytes were written; "
                                     "delete the folder to encode it again")
        self.files = [str(cache_dir / name) for name in recorded["shards"]]
        self.random_flip = random_flip
        shard_of, position_of = {}, {}
        for s, file in enumerate(self.files):
            with safe_open(file, framework="pt") as f:
                for position, row in enumerate(f.get_tensor("rows").tolist()):
                    shard_of[row], position_of[row] = s, position
        self.rows = np.array(sorted(shard_of), dtype=np.int64)  # the rows the cache holds (readable images)
        self.shard = np.array([shard_of[r] for r in self.rows], dtype=np.int32)
        self.position = np.array([position_of[r] for r in self.rows], dtype=np.int64)
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:  # open files stay in their process: each worker opens its own
        return {**self.__dict__, "_open": {}}

    def __call__(self, index: int, cell) -> torch.Tensor:
        k = int(np.searchsorted(self.rows, index))
        shard = int(self.shard[k])
        if shard not in self._open:
            self._open[shard] = safe_open(self.files[shard], framework="pt")
        moments = self._open[shard].get_slice("moments")[int(self.position[k]):int(self.position[k]) + 1][0].float()
        return moments.flip(-1) if self.random_flip and bool(torch.rand(()) < 0.5) else moments
