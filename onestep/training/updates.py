"""How a method states its training: named updates, each an optimizer over some parameters, a loss, a cadence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from onestep.errors import UserInputError


@dataclass
class OptimizerConfig:
    """AdamW settings of one update (DMD2: betas (0.9, 0.999), wd 0.01; SiD: betas (0, 0.999), wd 0)."""

    lr: float = 1e-5  # learning rate (may change on a resume)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's betas
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    eps: float = 1e-8  # AdamW's epsilon
    warmup_steps: int = 0  # linear LR warm-up, in this update's steps
    # diffusers.optimization.get_scheduler's name: constant_with_warmup (no decay), linear (to 0, then 0), cosine
    # (half a cosine to 0), polynomial (to 1e-7, then held), ...; `warmup_steps` and `lr_decay_steps` (warmup
    # included) count training iterations, as max_steps does, whatever this update's cadence: every schedule
    # advances once per iteration, as DMD2's do (a generator updated every 5th step warms up over warmup_steps / 5
    # of its own steps)
    lr_scheduler: str = "constant_with_warmup"
    lr_decay_steps: int | None = None  # see lr_scheduler
    grad_clip: float | None = 10.0  # max gradient norm (null: no clipping)
    # bitsandbytes' 8-bit AdamW (`pip install 'onestep[bnb]'`): 2 bytes of state per parameter instead of 8
    use_8bit: bool = False


def make_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The AdamW every update (and DisBack's path recording) steps with."""
    if config.use_8bit:
        try:
            import bitsandbytes
        except ImportError:
            raise UserInputError("use_8bit needs bitsandbytes: pip install 'onestep[bnb]'") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, betas=tuple(config.betas),
                                            weight_decay=config.weight_decay, eps=config.eps)
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                             eps=config.eps)


def make_lr_scheduler(optimizer: torch.optim.Optimizer,
                      config: OptimizerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The update's learning-rate schedule through diffusers' `get_scheduler`, stepped once per training iteration."""
    from diffusers.optimization import SchedulerType, get_scheduler

    names = [t.value for t in SchedulerType if t is not SchedulerType.PIECEWISE_CONSTANT]
    if config.lr_scheduler not in names:
        raise UserInputError(f"lr_scheduler must be one of {', '.join(names)}, got {config.lr_scheduler!r}")
    decays = config.lr_scheduler not in ("constant", "constant_with_warmup")
    if decays and (config.lr_decay_steps is None or config.lr_decay_steps <= config.warmup_steps):
        raise UserInputError(f"lr_scheduler {config.lr_scheduler} needs lr_decay_steps > warmup_steps "
                             f"({config.warmup_steps}), got {config.lr_decay_steps}")
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.lr_decay_steps if decays else None)


@dataclass
class LossOutput:
    """A scalar loss to minimise and float-valued logs (already detached)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class Update:
    """One optimizer's rule: minimise `loss(module)` over `module`'s trainable parameters when step % every == 0.

    The loss receives the module as prepared by accelerate (DDP-wrapped under multi-process training), so its
    forward syncs gradients; other networks it uses are read without gradient to their parameters.
    `ema_decay` keeps an exponential moving average of the module (what gets exported when set).
    """

    name: str
    module: nn.Module
    loss: Callable[[nn.Module], LossOutput]
    optimizer: OptimizerConfig
    every: int = 1
    ema_decay: float | None = None

    def runs_at(self, step: int) -> bool:
        return step % self.every == 0
