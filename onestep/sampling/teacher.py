"""Multi-step samplers of the teacher (DDIM / DDPM through diffusers' schedulers; a flow teacher's Euler ODE) on a
guided x0-denoiser."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from onestep.models.conditioning import Condition
from onestep.models.schedules import FlowSchedule
from onestep.models.teacher import Teacher


SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def sampler_label(teacher: Teacher, sampler: str = "ddim") -> str:
    """How metric keys and tables name the sampler `sample_teacher` runs: a flow teacher's is its Euler ODE."""
    return "euler" if isinstance(teacher.schedule, FlowSchedule) else sampler


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
    if isinstance(teacher.schedule, FlowSchedule) and sampler != "ddim":
        raise ValueError("a flow teacher samples with its Euler ODE (sampler ddim)")
    device = teacher.device
    out = []
    for start in range(0, num_images, batch_size):
        cond = condition[start:start + batch_size].to(device)
        n = min(batch_size, num_images - start)
        x = (noise[start:start + n].to(device) if noise is not None
             else torch.randn((n, *teacher.sample_shape), generator=generator, device=device))
        if isinstance(teacher.schedule, FlowSchedule):
            out.append(flow_euler(teacher, x, cond, num_steps, guidance_scale))
            continue
        scheduler = SAMPLERS[sampler].from_config(teacher.scheduler.config, prediction_type="sample")
        scheduler.set_timesteps(num_steps, device=device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x0 = teacher.x0(x, t, cond, guidance_scale)
            x = scheduler.step(x0, t, x, generator=generator).prev_sample
        out.append(x.float())
    return torch.cat(out)


def trailing_grid(num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """`num_steps` decreasing grid times from T-1, evenly spaced (trailing): T = 1000, 4 steps: 999, 749, 499, 249."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    return (num_train_timesteps - torch.arange(num_steps) * (num_train_timesteps / num_steps)).round().long() - 1


@torch.no_grad()
def flow_euler(teacher: Teacher, x: torch.Tensor, condition: Condition, num_steps: int,
               guidance_scale: float | None = None) -> torch.Tensor:
    """A flow teacher's Euler ODE from noise x at s = 1 over `trailing_grid` and then to s = 0: the sigmas of its
    pipeline's `num_steps`-step sampler (linspace(1, 1/N, N) shifted, then 0). Each step
    x_s = x_t + (s - t) v = (1 - s) x0 + s eps(x0, x_t), written through the x0 read-out."""
    schedule = teacher.schedule
    grid = trailing_grid(num_steps, schedule.num_train_timesteps).tolist()
    x0 = x
    for i, t in enumerate(grid):
        x0 = teacher.x0(x, torch.tensor(t, device=x.device), condition, guidance_scale)
        if i + 1 < len(grid):
            x = schedule.add_noise(x0, schedule.x0_to_eps(x0, x, torch.tensor(t)), torch.tensor(grid[i + 1]))
    return x0.float()
