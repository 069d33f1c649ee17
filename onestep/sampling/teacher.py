"""Multi-step samplers of the teacher (DDIM / DDPM through diffusers' schedulers) on a guided x0-denoiser."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from onestep.models.conditioning import Condition
from onestep.models.teacher import Teacher


SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


@torch.no_grad()
def sample_teacher(teacher: Teacher, condition: Condition, num_images: int, num_steps: int, sampler: str = "ddim",
                   guidance_scale: float | None = None, generator: torch.Generator | None = None,
                   batch_size: int = 500, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher samples in model space from `num_steps` steps of DDIM (eta 0) or ancestral DDPM.

    The scheduler is rebuilt from the teacher's own config (its timestep spacing, clipping, schedule) and fed the
    guided x0-prediction directly (`prediction_type="sample"`), so guidance and parameterisation stay in Teacher.
    `noise` (num_images, C, H, W) fixes the starting noise (DMD's regression pairs); else it is drawn here.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    device = teacher.device
    out = []
    for start in range(0, num_images, batch_size):
        cond = condition[start:start + batch_size].to(device)
        n = min(batch_size, num_images - start)
        scheduler = SAMPLERS[sampler].from_config(teacher.scheduler.config, prediction_type="sample")
        scheduler.set_timesteps(num_steps, device=device)
        x = (noise[start:start + n].to(device) if noise is not None
             else torch.randn((n, *teacher.sample_shape), generator=generator, device=device))
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x0 = teacher.x0(x, t, cond, guidance_scale)
            x = scheduler.step(x0, t, x, generator=generator).prev_sample
        out.append(x.float())
    return torch.cat(out)
