"""The one-step generator: a trainable copy of the teacher UNet, read out as x0 at an init timestep on pure noise."""

from __future__ import annotations

import torch
from torch import nn

from onestep.models.conditioning import Condition
from onestep.models.schedules import VPSchedule
from onestep.models.unet import trainable_copy, unet_x0


INPUT_SCALINGS = ("sigma", "unit")


class Generator(nn.Module):
    """G(z, c) = x0-read-out of the UNet at t_0 on input sigma_{t_0} z (DMD2: t_0 = T-1; SiD: VE sigma 2.5), or with
    `input_scaling="unit"` on z itself (DMD2's SDXL one-step student: z ~ N(0, I) read out at t_0 = 399).

    With several `timesteps` it is DMD2's multi-step generator: x0 at t_i is re-noised to t_{i+1} with *fresh*
    noise (x = alpha x0 + sigma eps) and read out again. The exported OneStepPipeline runs exactly this recursion.
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, timesteps: list[int] | tuple[int, ...] = (999,),
                 input_scaling: str = "sigma"):
        super().__init__()
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {', '.join(INPUT_SCALINGS)}, got {input_scaling!r}")
        if not timesteps or any(not 0 <= t < schedule.num_train_timesteps for t in timesteps):
            raise ValueError(f"generator timesteps must lie in [0, {schedule.num_train_timesteps}), got {timesteps}")
        if list(timesteps) != sorted(timesteps, reverse=True):
            raise ValueError(f"generator timesteps must be decreasing, got {timesteps}")
        self.unet = unet
        self.schedule = schedule
        self.timesteps = list(timesteps)
        self.input_scaling = input_scaling

    @classmethod
    def from_teacher(cls, teacher_unet: nn.Module, schedule: VPSchedule, timesteps=(999,),
                     share_frozen: bool = False, input_scaling: str = "sigma") -> Generator:
        """A float32, trainable deep copy of the teacher's UNet, or one sharing its frozen weights (a LoRA base;
        `onestep.models.unet.trainable_copy`). The teacher itself stays frozen."""
        return cls(trainable_copy(teacher_unet, share_frozen), schedule, timesteps, input_scaling)

    def input_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The UNet input at t_0: pure noise scaled to the marginal noise level sigma_{t_0} ("sigma"), or the noise
        itself ("unit")."""
        if self.input_scaling == "unit":
            return noise
        return self.schedule.sigma(self.timesteps[0], noise.dim()).to(noise.device) * noise

    def forward(self, noise: torch.Tensor, condition: Condition, step: int = 0,
                x_t: torch.Tensor | None = None) -> torch.Tensor:
        """x0 from step `step` of the recursion; `x_t` is the (re-noised) input there, `input_noise(z)` by default."""
        x_t = self.input_noise(noise) if x_t is None else x_t
        return unet_x0(self.unet, self.schedule, x_t, torch.tensor(self.timesteps[step], device=noise.device),
                       condition)

    def renoise(self, x0: torch.Tensor, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x at timesteps[step] from an x0 estimate, with fresh noise (DMD2's backward simulation)."""
        fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        t = torch.tensor(self.timesteps[step], device=x0.device)
        return self.schedule.add_noise(x0, fresh, t)

    @torch.no_grad()
    def simulate(self, noise: torch.Tensor, condition: Condition, steps: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the first `steps` steps without gradient; returns the UNet input x at timesteps[steps]."""
        x_t = self.input_noise(noise)
        for i in range(steps):
            x_t = self.renoise(self(noise, condition, i, x_t), i + 1, generator)
        return x_t

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, condition: Condition, generator: torch.Generator | None = None):
        """All steps (inference): x0 after the last timestep."""
        last = len(self.timesteps) - 1
        return self(noise, condition, last, self.simulate(noise, condition, last, generator))
