"""Calling a diffusers UNet in onestep's convention: one place for the call signature and the x0 read-out."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from onestep.conditioning import Condition
from onestep.schedules import VPSchedule


def takes_text(unet: nn.Module) -> bool:
    """True for UNet2DConditionModel-like modules (an `encoder_hidden_states` argument)."""
    return "encoder_hidden_states" in inspect.signature(unet.forward).parameters


def unet_forward(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
    """The raw UNet output at (x_t, t) for a batch condition, run in the UNet's dtype."""
    dtype = next(unet.parameters()).dtype
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in condition.unet_kwargs().items()}
    return unet(x_t.to(dtype), t, **kwargs, return_dict=False)[0]


def unet_x0(unet: nn.Module, schedule: VPSchedule, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
            prediction_type: str | None = None) -> torch.Tensor:
    """One UNet call read out as an x0-prediction in float32 (teacher, generator and critics all use this)."""
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    return schedule.to_x0(unet_forward(unet, x_t, t, condition), x_t, t, prediction_type)


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Let gradients flow through `module`'s inputs without computing or storing any for its parameters."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
