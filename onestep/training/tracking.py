"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate: scalars, learning rates, sample grids."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available

from onestep.errors import UserInputError


TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # train.report_to -> accelerate's log_with
_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


def check_tracker(report_to: str) -> None:
    """Refuse an unknown tracker, or one whose package is missing (accelerate would silently log nowhere)."""
    if report_to not in TRACKERS:
        raise UserInputError(f"train.report_to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    if report_to != "none" and not _AVAILABLE[report_to]():
        raise UserInputError(f"train.report_to={report_to} needs the {report_to} package: pip install {report_to}")


def tracker_config(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested run config flattened to `section.key` -> a scalar, as trackers' hyperparameter tables take it."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in (vars(config) if not isinstance(config, dict) else config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "__dataclass_fields__"):
            flat.update(tracker_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:  # None, lists: as text
            flat[name] = str(value)
    return flat


def log_grid(accelerator: Accelerator, name: str, images: torch.Tensor, step: int) -> None:
    """A batch of uint8 images as one grid image (the same grid as the PNG) in every tracker that takes images."""
    from onestep.eval.grid import grid_array

    grid = grid_array(images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: grid[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):  # wandb: a list of (H, W) or (H, W, 3) images
            tracker.log_images({name: [grid[..., 0] if grid.shape[-1] == 1 else grid]}, step=step)
