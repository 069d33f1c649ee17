"""Teacher score matching (MSD, Song et al. 2024/25, stage 0): fit a smaller denoiser to the teacher's predictions.

A channel-reduced UNet is trained to reproduce the frozen teacher's x0-prediction at every noise level:
  x_t = alpha_t x + sigma_t eps,  x ~ real images,  t ~ U{0..T-1},
  L = mean_CHW (x0_small(x_t, t, c) - sg(x0_teacher(x_t, t, c)))^2
The result initialises MSD's smaller students (without it they do not converge: FID 11.67 vs 2.88 in the paper).
The target is the teacher's, not the data's, so the small network inherits the teacher's score, not a fresh fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from onestep.data.conditions import ConditionSampler
from onestep.models.denoising import sample_timesteps
from onestep.models.teacher import Teacher
from onestep.models.unet import reduced_unet, unet_x0
from onestep.training.updates import LossOutput, OptimizerConfig, Update


@dataclass
class TSMOptions:
    """`options:` of a tsm config."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # the smaller denoiser's widths
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, weight_decay=0.0))  # AdamW
    ema_decay: float | None = 0.999  # EMA decay of the exported denoiser
    eval_steps: int = 10  # DDIM steps of the periodic FD evaluation of the small denoiser

    def validate(self) -> None:
        if self.optimizer.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")


class TeacherScoreMatching:
    """A trainer task: one update, the small denoiser; exported as a teacher-layout folder (DDIM-sampleable)."""

    options_cls = TSMOptions

    def __init__(self, teacher: Teacher, options: TSMOptions, conditions: ConditionSampler | None = None,
                 judge=None, batch_size: int = 64, real=None, **_unused):
        if real is None:
            raise ValueError("teacher score matching needs real images for its noisy inputs (data.name digits, "
                             "image_folder or dataset)")
        self.teacher, self.options, self.judge, self.batch_size, self.real = teacher, options, judge, batch_size, real
        self.conditions = conditions or ConditionSampler()
        self.unet = reduced_unet(teacher.unet, options.block_out_channels).float().train()
        # the small denoiser with the teacher's VAE and text encoders, for evaluation (unguided, as it is trained)
        self.student_view = teacher.with_unet(self.unet, frozen=False)
        self.student_view.guidance_scale = 1.0

    def updates(self) -> list[Update]:
        return [Update("unet", self.unet, self.loss, self.options.optimizer, ema_decay=self.options.ema_decay)]

    def loss(self, unet: torch.nn.Module) -> LossOutput:
        device, schedule = self.teacher.device, self.teacher.schedule
        x, condition = self.real.sample(self.batch_size, device)
        if not self.real.conditioned and len(self.conditions):
            condition = self.conditions(self.batch_size, device)  # any condition has a well-defined teacher target
        t = sample_timesteps(self.batch_size, 0, schedule.num_train_timesteps, device)
        x_t = schedule.add_noise(x, torch.randn_like(x), t)
        with torch.no_grad():
            target = self.teacher.x0(x_t, t, condition, guidance_scale=1.0)
        prediction = unet_x0(unet, schedule, x_t, t, condition)
        return LossOutput((prediction - target).square().mean())

    def evaluate(self) -> dict[str, float]:
        if self.judge is None:
            return {}
        return self.judge.teacher_metrics(self.student_view, steps=[self.options.eval_steps])

    def sample_images(self) -> torch.Tensor | None:
        return None if self.judge is None else self.judge.teacher_grid(self.student_view, steps=50)

    def export_pipeline(self, out_dir: Path) -> None:
        from onestep.export.pipeline import export_denoiser

        export_denoiser(self.unet, self.teacher.scheduler, out_dir)
