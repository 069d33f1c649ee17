"""BOOT (Gu et al. 2023): data-free distillation by bootstrapping the teacher's DDIM trajectory in signal space.

Algorithm (one update; no real data, no critic):
  the student g(eps, t, c) predicts the signal y_t = (x_t - sigma_t eps) / alpha_t of the teacher's DDIM
  trajectory that starts at the noise eps (x_t = alpha_t y_t + sigma_t eps, the same eps for every t).
  eps ~ N(0, I), c ~ conditions, (t, s) = consecutive points of the training grid, t > s >= 0
  1. exact DDIM step in signal space (BOOT eq. 7):
       y_s = y_t + delta' (f(x_t, t) - y_t),   delta' = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)
  2. bootstrapping target from the student itself (BOOT eq. 8, stop-gradient):
       y^_t = sg(g(eps, t)),  x^_t = alpha_t y^_t + sigma_t eps,  y^*_s = y^_t + delta' (f(x^_t, t) - y^_t)
       L_BS = mean_batch w(delta') mean_CHW (g(eps, s) - y^*_s)^2,  w = 1/delta'^2 (optionally clipped) or 1
  3. boundary condition at T-1 (BOOT eq. 9): L_BC = mean (g(eps, T-1) - f(x_T, T-1))^2, on the first
     `boundary_batch_fraction` of the batch (at zero terminal SNR no other term reads g(eps, T-1): the pair
     (T-1, s) has delta' = 1 and x^_{T-1} = eps, so L_BS already carries the boundary and L_BC only keeps the
     student's start on the teacher; it costs a student forward+backward and a teacher call per sample)
  L = L_BS + beta L_BC;  one call g(eps, 0) is the one-step sample.
f is the frozen teacher's x0-prediction, guided by the teacher's guidance scale in both terms (so the student
learns the guided trajectory and samples it unguided in one call). All loss arithmetic is float32; delta' is
computed in float64 from `alphas_cumprod`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from onestep.distillers.base import Distiller
from onestep.models.conditioning import Condition
from onestep.models.lora import LoRAConfig
from onestep.models.schedules import Schedule
from onestep.models.unet import unet_forward
from onestep.training.updates import LossOutput, OptimizerConfig, Update


WEIGHTINGS = ("inverse_delta_squared", "clipped", "none")


def training_grid(num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """`num_steps + 1` increasing timesteps round(linspace(0, T-1, num_steps + 1)): 0 and T-1 always included.

    Training pairs are consecutive points (t = grid[i], s = grid[i-1]); 0 is the end of the trajectory (the
    exported sample g(eps, 0)) and T-1 is its start (the boundary).
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"num_grid_steps must be in [1, {num_train_timesteps - 1}], got {num_steps}")
    return torch.linspace(0, num_train_timesteps - 1, num_steps + 1, dtype=torch.float64).round().long()


def signal_step_size(schedule: Schedule, t: torch.Tensor, s: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """delta' = 1 - (sigma_s alpha_t) / (alpha_s sigma_t) of the DDIM step t -> s < t, in float64, returned float32.

    Safe for every grid pair: sigma_t > 0 for t >= 1 and alpha_s > 0 for s < T-1; alpha_t = 0 (zero terminal SNR)
    gives delta' = 1 (the first step lands on the teacher's read-out), and small t gives delta' -> 0 without error.
    """
    alpha_t, sigma_t = schedule.alpha(t, ndim, torch.float64), schedule.sigma(t, ndim, torch.float64)
    alpha_s, sigma_s = schedule.alpha(s, ndim, torch.float64), schedule.sigma(s, ndim, torch.float64)
    return (1 - (sigma_s * alpha_t) / (alpha_s * sigma_t)).float()


def ddim_signal_step(y_t: torch.Tensor, x0: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """y_s = y_t + delta' (x0 - y_t): DDIM (eta 0) from t to s written for the signal, eps held fixed."""
    return y_t.float() + step * (x0.float() - y_t.float())


def bootstrap_weight(step: torch.Tensor, weighting: str, clip: float) -> torch.Tensor:
    """Per-sample weight of L_BS: 1/delta'^2 makes it a match of finite-difference velocities (y_s - y_t)/delta'
    against (f - y_t), the same scale at every step; `clipped` caps it where small steps would let it explode."""
    step = step.flatten()
    if weighting == "none":
        return torch.ones_like(step)
    inverse = step.square().reciprocal()
    return inverse if weighting == "inverse_delta_squared" else inverse.clamp_max(clip)


def bootstrap_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_batch w * mean_CHW (prediction - sg(target))^2, in float32."""
    squared = (prediction.float() - target.detach().float()).square().flatten(1).mean(1)
    return (weight * squared).mean()


class SignalGenerator(nn.Module):
    """BOOT's student g(eps, t, c): a trainable teacher-UNet copy predicting the trajectory's signal y_t.

    Parameterisation: the UNet sees the noise eps itself as its image, at timestep t, and its raw output is read out
    through the teacher's parameterisation *at the terminal timestep T-1, as if eps were x_{T-1}*:
        g(eps, t) = a eps + b UNet(eps, t, c),  (a, b) = (alpha_T, -sigma_T) for v-prediction,
        (1/alpha_T, -sigma_T/alpha_T) for epsilon, (0, 1) for sample prediction (alpha_T, sigma_T at t = T-1).
    Why: (i) at t = T-1 this is exactly the teacher's own read-out of x_T = eps, so a teacher copy starts with
    g(eps, T-1) = f(eps, T-1) and the boundary loss starts at 0 (guidance aside); (ii) the read-out coefficients
    do not depend on t, so nothing like 1/alpha_t or 1/sigma_t enters as t -> 0 or t -> T-1 and the network keeps
    one output meaning (the signal, an image-scale quantity) at every t; (iii) time reaches the network only
    through its timestep embedding, which the teacher copy already has. For a zero-terminal-SNR v-prediction
    teacher (the digits teacher) g = -UNet(eps, t): no division at all. An epsilon teacher carries its terminal
    conditioning 1/alpha_T (about 15 for SD's scaled_linear betas); one with zero terminal SNR has no x0 read-out
    at T-1 at all and is refused.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule):
        super().__init__()
        if schedule.prediction_type == "epsilon" and schedule.alpha(schedule.num_train_timesteps - 1, 1) == 0:
            raise ValueError("BOOT needs the teacher's x0 read-out at T-1, which an epsilon-prediction teacher with "
                             "zero terminal SNR does not have (use a v-prediction teacher)")
        self.unet = unet
        self.schedule = schedule
        self.terminal = schedule.num_train_timesteps - 1
        self.timesteps = [0]  # the one-step read-out: the exported pipeline evaluates g(eps, 0)

    def forward(self, noise: torch.Tensor, condition: Condition, t: torch.Tensor | int = 0) -> torch.Tensor:
        """y_t = g(eps, t, c) in float32; `t` is one timestep or one per sample."""
        out = unet_forward(self.unet, noise, torch.as_tensor(t, device=noise.device), condition, self.schedule)
        return self.schedule.to_x0(out, noise, torch.tensor(self.terminal, device=noise.device))

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, condition: Condition, generator: torch.Generator | None = None):
        """The one-step sample g(eps, 0, c) (the Judge's interface; `generator` is unused: no fresh noise)."""
        return self(noise, condition, 0)


@dataclass
class BOOTOptions:
    """`options:` of a boot config."""

    num_grid_steps: int = 10  # training grid round(linspace(0, T-1, N+1)); the teacher's 10-step DDIM is near 50
    boundary_weight: float = 0.1  # beta of L_BC (unverified in the paper; a re-implementation's value)
    boundary_batch_fraction: float = 0.25  # share of the batch that also takes L_BC (1.0: a digits step 1.4x slower)
    loss_weighting: str = "clipped"  # inverse_delta_squared | clipped (min(1/delta'^2, weight_clip)) | none
    weight_clip: float = 100.0  # inactive on a coarse grid (digits, 10 steps: 1/delta'^2 <= 6.5)
    generator_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=10.0))
    generator_ema: float | None = 0.99  # EMA decay of the exported generator
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters instead of full fine-tuning (models/lora.py)

    def validate(self) -> None:
        if self.num_grid_steps < 1:
            raise ValueError(f"num_grid_steps must be >= 1, got {self.num_grid_steps}")
        if self.boundary_weight < 0:
            raise ValueError(f"boundary_weight must be >= 0, got {self.boundary_weight}")
        if not 0 < self.boundary_batch_fraction <= 1:
            raise ValueError(f"boundary_batch_fraction must be in (0, 1], got {self.boundary_batch_fraction}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(WEIGHTINGS)}, got {self.loss_weighting!r}")
        if self.weight_clip <= 0:
            raise ValueError(f"weight_clip must be > 0, got {self.weight_clip}")
        if self.generator_optimizer.lr <= 0:
            raise ValueError(f"generator_optimizer.lr must be > 0, got {self.generator_optimizer.lr}")
        if self.generator_ema is not None and not 0 <= self.generator_ema < 1:
            raise ValueError(f"generator_ema must be in [0, 1) or null, got {self.generator_ema}")
        self.lora.validate()


class BOOT(Distiller):
    """BOOT over the shared frame: one generator update per step, the teacher queried once at t and once at T-1.

    Real images (`real=` from the run) are ignored: BOOT is data-free and draws only noise and conditions.
    """

    options_cls = BOOTOptions
    # the exported OneStepPipeline reads the student out as a signal: one call g(eps, 0, c); `preview_timesteps`
    # gives y_t
    export_readout = "signal"

    def __init__(self, teacher, options: BOOTOptions, conditions=None, judge=None, batch_size: int = 64,
                 **_unused):
        super().__init__(teacher, options, conditions, judge, batch_size=batch_size)
        # the frame's float32 trainable teacher copy, read out as BOOT's signal instead of an x0 at a fixed t
        self.generator = SignalGenerator(self.generator.unet, teacher.schedule)
        self.grid = training_grid(options.num_grid_steps, teacher.schedule.num_train_timesteps)

    def updates(self) -> list[Update]:
        o = self.options
        return [Update("generator", self.generator, self.generator_loss, o.generator_optimizer,
                       ema_decay=o.generator_ema)]

    def generator_loss(self, student: nn.Module) -> LossOutput:
        """L_BS + beta L_BC on a fresh batch of noise, conditions and grid pairs (t, s)."""
        noise = torch.randn((self.batch_size, *self.teacher.sample_shape), device=self.device)
        condition = self.conditions(self.batch_size, self.device)
        index = torch.randint(1, len(self.grid), (self.batch_size,))
        return self.losses(student, noise, condition, self.grid[index].to(self.device),
                           self.grid[index - 1].to(self.device))

    @torch.no_grad()
    def bootstrap_target(self, student: nn.Module, noise: torch.Tensor, condition: Condition, t: torch.Tensor,
                         step: torch.Tensor) -> torch.Tensor:
        """y^*_s = y^_t + delta' (f(x^_t, t) - y^_t) with y^_t = g(eps, t) under no_grad (the stop-gradient)."""
        y_t = student(noise, condition, t).float()
        x_t = self.teacher.schedule.add_noise(y_t, noise, t)
        return ddim_signal_step(y_t, self.teacher.x0(x_t, t, condition), step)

    def losses(self, student: nn.Module, noise: torch.Tensor, condition: Condition, t: torch.Tensor,
               s: torch.Tensor) -> LossOutput:
        """The BOOT loss for given noise, conditions and per-sample pairs t > s.

        The cleaner point g(eps, s) and the boundary g(eps, T-1) (first `boundary_batch_fraction` of the samples)
        carry the gradient and run as one batched call (one forward per backward, as DDP wants); the noisier point
        g(eps, t) only builds the target.
        """
        o = self.options
        n = self.num_boundary(noise.shape[0])
        terminal = torch.full_like(t[:n], self.generator.terminal)
        y = student(torch.cat([noise, noise[:n]]), Condition.cat([condition, condition[:n]]), torch.cat([s, terminal]))
        y_s, y_T = y.float().split([noise.shape[0], n])
        step = signal_step_size(self.teacher.schedule, t, s, noise.dim())
        target_s = self.bootstrap_target(student, noise, condition, t, step)
        loss_bs = bootstrap_loss(y_s, target_s, bootstrap_weight(step, o.loss_weighting, o.weight_clip))
        loss_bc = self.boundary_loss(y_T, noise[:n], condition[:n]) if n else torch.zeros((), device=noise.device)
        return LossOutput(loss_bs + o.boundary_weight * loss_bc,
                          {"bootstrap": loss_bs.item(), "boundary": loss_bc.item(), "delta_mean": step.mean().item()})

    def boundary_loss(self, y_T: torch.Tensor, noise: torch.Tensor, condition: Condition) -> torch.Tensor:
        """L_BC = mean (y_T - f(x_T, T-1))^2 with x_T = alpha_T sg(y_T) + sigma_T eps.

        x_T is exactly eps at zero terminal SNR (the paper's x_T = eps), and otherwise the trajectory's own start,
        the point the first bootstrapping step (T-1, s) reads too.
        """
        terminal = torch.full((noise.shape[0],), self.generator.terminal, device=noise.device)
        with torch.no_grad():
            target = self.teacher.x0(self.teacher.schedule.add_noise(y_T, noise, terminal), terminal, condition)
        return (y_T - target).square().mean()

    def num_boundary(self, batch: int) -> int:
        """How many samples of a batch take L_BC: none when beta = 0, else at least one."""
        if self.options.boundary_weight == 0:
            return 0
        return max(1, round(self.options.boundary_batch_fraction * batch))


@torch.no_grad()
def teacher_signal_trajectory(teacher, noise: torch.Tensor, condition: Condition,
                              grid: torch.Tensor) -> dict[int, torch.Tensor]:
    """y_t of the teacher's DDIM (eta 0) started at x = eps on the grid's top timestep, in signal space.

    y at the top is the teacher's read-out of the start; each next grid point applies the exact signal-space step:
    what a perfect student returns.
    """
    schedule, ndim = teacher.schedule, noise.dim()
    top = int(grid[-1])
    signals = {top: teacher.x0(noise, torch.tensor(top, device=noise.device), condition)}
    for t, s in zip(grid.flip(0)[:-1].tolist(), grid.flip(0)[1:].tolist(), strict=True):
        t_, s_ = (torch.full((noise.shape[0],), v, device=noise.device) for v in (t, s))
        x_t = schedule.alpha(t_, ndim) * signals[t] + schedule.sigma(t_, ndim) * noise
        signals[s] = ddim_signal_step(signals[t], teacher.x0(x_t, t_, condition),
                                      signal_step_size(schedule, t_, s_, ndim))
    return signals


@torch.no_grad()
def trajectory_gap(student: SignalGenerator, teacher, noise: torch.Tensor, condition: Condition,
                   grid: torch.Tensor) -> dict[int, float]:
    """Mean squared error between the student's g(eps, t) and the teacher's DDIM signal y_t at each grid t."""
    target = teacher_signal_trajectory(teacher, noise, condition, grid)
    return {t: float((student(noise, condition, t) - y).square().mean()) for t, y in sorted(target.items())}
