"""Score identity Distillation (Zhou et al., ICML 2024): SiD, the base of Score Forgetting Distillation.

Algorithm (1:1 alternation):
  critic:    L_psi = denoising loss of the fake score on sg(G(z)), t on the generator loss's range (critic_timesteps)
  SiD-LSG (text teachers): the fake score is guided too, at kappa_1 in L_psi and kappa_2 in L_theta (fake_*guidance)
  generator: x_g = G(sigma_init z), x_t = alpha_t x_g + sigma_t eps (gradient flows through x_t),
             omega = sg(1 / mean_CHW |x_g - mu_real|),
             L_theta = mean_batch sum_CHW omega (mu_real - mu_fake) * [(mu_real - x_g) - alpha (mu_real - mu_fake)]
  with both score networks' parameters frozen in the generator loss (gradients reach G through their inputs).
  optional (options.regression, not in the paper): + w C H W mean_i ||G(z_i, c_i) - y_i||^2 on DMD's cached pairs of
             noise z_i and the teacher's ODE sample y_i (distillers/regression.py)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onestep.distillers.base import Distiller
from onestep.distillers.regression import RegressionOptions, paired_regression
from onestep.models.conditioning import Condition
from onestep.models.critics import FakeScore
from onestep.models.denoising import denoising_loss, sample_timesteps
from onestep.models.lora import LoRAConfig
from onestep.models.teacher import classifier_free_guidance
from onestep.models.unet import call_frozen
from onestep.training.updates import LossOutput, OptimizerConfig, Update


def sid_loss(x_g: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD generator loss per sample (SiD eq. 22 with the stop-gradient normaliser omega of its official code).

    Gradients flow through all three tensors (the score networks' inputs depend on x_g); omega does not.
    """
    x_g, mu_real, mu_fake = x_g.float(), mu_real.float(), mu_fake.float()
    diff = mu_real - mu_fake
    return (sid_normaliser(x_g, mu_real) * diff * ((mu_real - x_g) - alpha * diff)).sum(dim=tuple(range(1, x_g.dim())))


def sid_normaliser(x_g: torch.Tensor, mu_real: torch.Tensor) -> torch.Tensor:
    """omega = sg(1 / mean_CHW |x_g - mu_real|), shape (B, 1, ..., 1): the official code's `weight_factor`."""
    dims = tuple(range(1, x_g.dim()))
    return 1.0 / (x_g.float() - mu_real.float()).detach().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)


@dataclass
class SiDOptions:
    """`options:` of a sid config."""

    alpha: float = 1.2  # 1.0 for text-to-image teachers
    init_ve_sigma: float = 2.5  # generator input noise level, as a VE sigma mapped onto the teacher's VP schedule
    sigma_min: float = 0.14  # range of the generator loss's noise levels (VE sigma)
    sigma_max: float = 13.0  # (upper end)
    # the fake score's denoising-loss timesteps: "generator" = the generator loss's range (as the official VP codes of
    # SFD and SiD-LSG train it), "all" = every training timestep 0..T-1
    critic_timesteps: str = "generator"
    # SiD-LSG's guidance of the fake score (the teacher's is teacher.guidance_scale, LSG's kappa_4): classifier-free
    # guidance with the teacher's null condition in its denoising loss (kappa_1) and in the generator loss
    # (kappa_2 = kappa_3); 1 = none. The official SD runs set all four to 2.
    fake_train_guidance: float = 1.0
    fake_guidance: float = 1.0  # kappa_2 = kappa_3 (see above)
    generator_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=10.0))
    critic_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=10.0))
    generator_ema: float | None = 0.99  # EMA decay of the exported generator
    # recompute activations in the backward pass of all three UNets: the generator loss differentiates through the
    # teacher and the fake score, so its activation memory is ~3 UNets' worth without it
    gradient_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters instead of full fine-tuning (models/lora.py)
    # DMD's paired regression (distillers/regression.py), off by default: a pull toward the teacher's own samples that
    # SiD's score-gap loss lacks. Its distance is summed over C, H, W as SiD's loss is, so that a weight strikes the
    # balance it strikes against DMD's per-element loss
    regression: RegressionOptions = field(default_factory=RegressionOptions)

    def validate(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.init_ve_sigma <= 0:
            raise ValueError(f"init_ve_sigma must be > 0, got {self.init_ve_sigma}")
        if self.fake_train_guidance < 0 or self.fake_guidance < 0:
            raise ValueError("fake_train_guidance and fake_guidance must be >= 0")
        if self.critic_timesteps not in ("generator", "all"):
            raise ValueError(f"critic_timesteps must be generator or all, got {self.critic_timesteps!r}")
        for name in ("generator_optimizer", "critic_optimizer"):
            if getattr(self, name).lr <= 0:
                raise ValueError(f"{name}.lr must be > 0, got {getattr(self, name).lr}")
        self.lora.validate()


class SiD(Distiller):
    """SiD over the shared frame: generator at the VP timestep of VE sigma `init_ve_sigma`, one fake score."""

    options_cls = SiDOptions

    def __init__(self, teacher, options: SiDOptions, conditions=None, judge=None, batch_size: int = 64,
                 regression_cache=None, **_unused):
        t_init = teacher.schedule.generator_timestep(options.init_ve_sigma)
        super().__init__(teacher, options, conditions, judge, [t_init], batch_size)
        self.regression = paired_regression(teacher, self.conditions, options.regression, regression_cache)
        self.fake = FakeScore.from_teacher(teacher.unet, teacher.schedule,
                                            share_frozen=self.shares_base(critic=True))
        t_lo, t_hi = (int(teacher.schedule.timestep_for_ve_sigma(s)) for s in (options.sigma_min, options.sigma_max))
        self.t_range = (t_lo, t_hi + 1)
        if options.gradient_checkpointing:  # the fake score is checkpointed per call (see score_pair)
            for unet in (teacher.unet, self.generator.unet):
                unet.enable_gradient_checkpointing()

    def updates(self) -> list[Update]:
        o = self.options
        return [Update("generator", self.generator, self.regressed_generator_loss, o.generator_optimizer,
                       ema_decay=o.generator_ema),
                Update("critic", self.fake, self.critic_loss, o.critic_optimizer)]

    def regressed_generator_loss(self, generator) -> LossOutput:
        """The method's generator loss (SiD's, SiDA's, SFD's) plus the paired regression term when it is on."""
        out = self.generator_loss(generator)
        if self.regression is None:
            return out
        return self.regression.add_to(out, generator, scale=math.prod(self.teacher.sample_shape))

    def guided(self, call: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor], x_t: torch.Tensor,
               t: torch.Tensor, condition: Condition, scale: float) -> torch.Tensor:
        """`call` (a fake-score output) with classifier-free guidance at `scale` (SiD-LSG); the unconditional pass
        uses the teacher's null condition (null class, empty prompt). Outputs are linear in x0, so this guides raw
        outputs (the denoising loss) and x0 alike."""
        if scale == 1.0 or (condition.class_labels is None and condition.encoder_hidden_states is None):
            return call(x_t, t, condition)
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        both = Condition.cat([self.teacher.null_condition(condition), condition])
        uncond, cond = call(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return classifier_free_guidance(uncond, cond, scale)

    def score_pair(self, x_g: torch.Tensor, teacher_condition: Condition | Callable[[torch.Tensor], Condition],
                   fake_condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_real, mu_fake) at a random noisy x_t of x_g, differentiable w.r.t. x_g, parameters frozen.

        SFD queries the teacher and the fake score with different conditions; SiD passes the same one twice. A
        callable teacher_condition is given sg(mu_fake) first (SFD's classifier override labels it per x_t).
        """
        t = sample_timesteps(x_g.shape[0], *self.t_range, self.device)
        x_t = self.teacher.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        mu_fake = self.guided(self.frozen_fake, x_t, t, fake_condition, self.options.fake_guidance)
        if callable(teacher_condition):
            teacher_condition = teacher_condition(mu_fake.detach())
        mu_real = self.teacher.x0_with_grad(x_t, t, teacher_condition)
        return mu_real, mu_fake

    def frozen_fake(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The fake score's x0 at x_t, its parameters frozen (gradients reach x_t only)."""
        return call_frozen(self.fake, x_t, t, condition, checkpoint=self.options.gradient_checkpointing)

    def critic_timesteps(self, batch: int) -> torch.Tensor | None:
        """The fake score's denoising timesteps: the generator loss's range, or None (0..T-1) with `all`."""
        if self.options.critic_timesteps == "all":
            return None
        return sample_timesteps(batch, *self.t_range, self.device)

    def critic_denoising_loss(self, fake, x: torch.Tensor, condition: Condition) -> torch.Tensor:
        """Per-sample denoising loss of the fake score on generator samples x, at `critic_timesteps`, its output
        guided at `fake_train_guidance`."""
        raw = functools.partial(fake, output="raw")

        def guided_raw(x_t, t, c):
            return self.guided(raw, x_t, t, c, self.options.fake_train_guidance)

        return denoising_loss(guided_raw, self.teacher.schedule, x, condition, self.critic_timesteps(x.shape[0]))

    def generator_loss(self, generator) -> LossOutput:
        x_g, _, condition = self.draw(generator)
        mu_real, mu_fake = self.score_pair(x_g, condition, condition)
        loss = sid_loss(x_g, mu_real, mu_fake, self.options.alpha).mean()
        return LossOutput(loss, {"score_gap": (mu_real - mu_fake).abs().mean().item()})

    def critic_loss(self, fake) -> LossOutput:
        with torch.no_grad():
            x_g, _, condition = self.draw(self.generator)
        return LossOutput(self.critic_denoising_loss(fake, x_g, condition).mean())
