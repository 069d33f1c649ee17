"""DMD2 on a toy two-mode teacher: the one-step student must keep both modes and their weights (no collapse)."""

import functools

import pytest
import torch

from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.models.conditioning import Condition
from onestep.models.denoising import denoising_loss
from onestep.models.teacher import Teacher
from onestep.models.unet import unet_forward
from onestep.sampling.teacher import sample_teacher
from onestep.training.trainer import Trainer, TrainerConfig
from onestep.training.updates import OptimizerConfig
from tests.conftest import scheduler, tiny_unet


PLUS, MINUS, WEIGHT = 0.8, -0.6, 0.7  # images are all +0.8 (70%) or all -0.6 (30%)


def _modes(x: torch.Tensor) -> tuple[float, float]:
    """Share of samples in the + mode, and mean distance of the samples to their nearest mode."""
    plus = x.mean(dim=(1, 2, 3)) > (PLUS + MINUS) / 2
    nearest = torch.where(plus, PLUS, MINUS).view(-1, 1, 1, 1)
    return plus.float().mean().item(), (x - nearest).abs().mean().item()


@pytest.fixture(scope="module")
def two_mode_teacher() -> Teacher:
    torch.manual_seed(0)
    unet = tiny_unet(num_classes=None, size=4)
    view = Teacher(unet, scheduler(), frozen=False)
    opt = torch.optim.AdamW(unet.parameters(), 2e-3)
    for _ in range(500):
        plus = (torch.rand(128, 1, 1, 1) < WEIGHT).float()
        x0 = (plus * PLUS + (1 - plus) * MINUS).expand(-1, 1, 4, 4)
        loss = denoising_loss(functools.partial(unet_forward, unet), view.schedule, x0, Condition()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Teacher(unet, scheduler())


@pytest.mark.slow
def test_dmd2_student_keeps_both_modes_and_their_weights(tmp_path, two_mode_teacher):
    torch.manual_seed(1)
    teacher_share, _ = _modes(sample_teacher(two_mode_teacher, Condition(), 2000, 20))
    assert abs(teacher_share - WEIGHT) < 0.06  # the toy teacher learned the data

    options = DMDOptions(gan=False, generator_every=5, generator_ema=0.95,
                         generator_optimizer=OptimizerConfig(lr=3e-4, weight_decay=0.0),
                         critic_optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0))
    dmd = build_distiller("dmd2", two_mode_teacher, options, batch_size=64)
    start_share, start_spread = _modes(dmd.generator.sample(torch.randn(2000, 1, 4, 4), Condition()))
    trainer = Trainer(dmd, tmp_path, TrainerConfig(max_steps=700, checkpoint_every=0, log_every=50))
    trainer.train()
    with trainer.ema_weights(), torch.no_grad():
        share, spread = _modes(dmd.generator.sample(torch.randn(4000, 1, 4, 4), Condition()))
    # a mode-collapsed student has share 0 or 1; the initial (teacher-copy) one-step output is the blurry mean
    assert abs(share - teacher_share) < 0.06, (share, teacher_share)
    assert spread < 0.5 * start_spread, (spread, start_spread)
