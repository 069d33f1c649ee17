"""The denoising (score-matching) loss shared by teacher training, fake-score critics and DisBack's path."""

from __future__ import annotations

from collections.abc import Callable

import torch

from onestep.models.conditioning import Condition
from onestep.models.schedules import Schedule


def sample_timesteps(batch: int, low: int, high: int, device: torch.device | str) -> torch.Tensor:
    """t ~ U{low, ..., high - 1}."""
    return torch.randint(low, high, (batch,), device=device)


def denoising_loss(net: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor], schedule: Schedule,
                   x0: torch.Tensor, condition: Condition, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE between a network's raw output and its parameterisation's target (DDPM eq. 14 / v-loss).

    `net(x_t, t, condition)` returns the raw UNet output (eps, v or x0 for an epsilon / v_prediction / sample
    UNet, as `schedule.prediction_type` says); t ~ U{0..T-1} and noise ~ N(0, I) unless given.
    """
    if t is None:
        t = sample_timesteps(x0.shape[0], 0, schedule.num_train_timesteps, x0.device)
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.from_x0(x0.float(), x_t, t)
    return (net(x_t, t, condition).float() - target).square().flatten(1).mean(1)
