"""Distribution Matching Distillation: DMD (Yin et al., CVPR 2024) and DMD2 (Yin et al., NeurIPS 2024).

Algorithm (one iteration; `dmd` and `dmd2` are presets of these options):
  1. every `generator_every`-th step, generator update:
       x = G(z, c)                                        (backward simulation for multi-step generators)
       L_G = L_DM(x) + w_gan_G * softplus(-D(x_t)) + w_reg * d(G(z_ref), y_ref)
  2. every step, critic update on sg(x):
       L_mu = denoising loss of the fake score on sg(x) + w_gan_D * [softplus(D(fake_t)) + softplus(-D(real_t))
              + k gamma / 2 ||grad_{real_t} D(real_t)||^2]      (R1 on every k = `gan_r1_every`-th step)
  D reads x_t = alpha_t A(x) + sigma_t eps, A = DiffAugment's `gan_augment` ops (identity when empty).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from onestep.distillers.base import Distiller
from onestep.distillers.regression import RegressionOptions, paired_regression
from onestep.errors import UserInputError
from onestep.models.attention import differentiable_twice
from onestep.models.augment import augment_ops, diff_augment
from onestep.models.conditioning import Condition
from onestep.models.critics import DEFAULT_DEPTHS, FakeScore, gan_discriminator_loss, gan_generator_loss, r1_penalty
from onestep.models.denoising import denoising_loss, sample_timesteps
from onestep.models.generator import INPUT_SCALINGS
from onestep.models.lora import LoRAConfig
from onestep.models.networks import is_sharded
from onestep.models.unet import call_frozen
from onestep.training.updates import LossOutput, OptimizerConfig, Update


def distribution_matching_loss(x: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7 with DMD2's normaliser: grad = (mu_fake - mu_real) / mean_CHW |x - mu_real|.

    Returns the per-sample loss 0.5 * mean_CHW (x - sg(x - grad))^2, whose gradient w.r.t. x is grad / numel(CHW).
    mu_real and mu_fake must carry no gradient; all arithmetic is float32.
    """
    x = x.float()
    with torch.no_grad():
        normaliser = (x - mu_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
        grad = torch.nan_to_num((mu_fake.float() - mu_real.float()) / normaliser)
        target = x - grad
    return 0.5 * (x - target).square().flatten(1).mean(1)


@dataclass
class DMDOptions:
    """`options:` of a dmd2 config (DMD2 preset: TTUR 5, GAN on, no regression)."""

    generator_timesteps: list[int] = field(default_factory=lambda: [999])  # read-out t
    # the generator's input at generator_timesteps[0]: "sigma" = sigma_t0 z (the marginal at t0), "unit" = z itself
    # (DMD2's SDXL one-step student, conditioned at t0 = 399 on unit-variance noise; its exports follow)
    generator_input: str = "sigma"
    dm_t_min: float = 0.02  # DM timestep range as a share of T
    dm_t_max: float = 0.98  # (upper end)
    generator_every: int = 5  # TTUR: the critic takes every step, the generator every N-th
    generator_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-5, weight_decay=0.01, warmup_steps=0, grad_clip=10.0))
    critic_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-4, weight_decay=0.01, warmup_steps=0, grad_clip=10.0))
    generator_ema: float | None = 0.99  # EMA decay of the exported generator (null: off)
    gan: bool = True  # DMD2's GAN head on the fake score
    gan_generator_weight: float = 3e-3  # the GAN term in the generator loss
    gan_critic_weight: float = 1e-2  # the GAN term in the critic loss
    # the GAN's noise t ~ U[0, gan_t_max T): DMD2's diffusion_gan_max_timestep / T; 0 = the clean sample at t = 0
    gan_t_max: float = 1.0
    # a flow transformer's GAN head reads the blocks at these fractional depths (FastGen: ~50/75/99%); UNets: mid block
    gan_depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    # R1 gradient penalty (Mescheder et al. 2018, eq. 9; DMD2's code has none): gamma / 2 E||grad D(real_t)||^2 on
    # D's noised real input, beside the discriminator loss (both weighted by gan_critic_weight); 0 = off
    gan_r1_gamma: float = 0.0
    gan_r1_every: int = 1  # lazy R1 (StyleGAN2): on every N-th step only, scaled by N
    # DiffAugment (Zhao et al. 2020; DMD2: none) on both inputs of D, before its noise (a latent model: on latents):
    # "translation,cutout" or a list of color, translation, cutout; "" = off
    gan_augment: Any = ""
    regression: RegressionOptions = field(default_factory=RegressionOptions)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters instead of full fine-tuning (models/lora.py)

    def validate(self) -> None:
        if not 0.0 <= self.dm_t_min < self.dm_t_max <= 1.0:
            raise ValueError(f"need 0 <= dm_t_min < dm_t_max <= 1, got {self.dm_t_min}, {self.dm_t_max}")
        if not self.gan_depths or any(not 0 < d <= 1 for d in self.gan_depths):
            raise ValueError(f"gan_depths must be fractions in (0, 1], got {self.gan_depths}")
        if not 0.0 <= self.gan_t_max <= 1.0:
            raise ValueError(f"gan_t_max must be in [0, 1], got {self.gan_t_max}")
        if self.gan_r1_gamma < 0 or self.gan_r1_every < 1:
            raise ValueError(f"need gan_r1_gamma >= 0 and gan_r1_every >= 1, got {self.gan_r1_gamma}, "
                             f"{self.gan_r1_every}")
        augment = augment_ops(self.gan_augment)  # (raises on an unknown op)
        if not self.gan and (self.gan_r1_gamma > 0 or augment):
            raise ValueError("gan_r1_gamma and gan_augment act on the GAN's discriminator: set gan: true")
        if self.generator_input not in INPUT_SCALINGS:
            raise ValueError(f"generator_input must be one of {', '.join(INPUT_SCALINGS)}, "
                             f"got {self.generator_input!r}")
        if self.generator_every < 1:
            raise ValueError(f"generator_every must be >= 1, got {self.generator_every}")
        for name in ("generator_optimizer", "critic_optimizer"):
            if getattr(self, name).lr <= 0:
                raise ValueError(f"{name}.lr must be > 0, got {getattr(self, name).lr}")
        self.lora.validate()


@dataclass
class DMD1Options(DMDOptions):
    """DMD preset: DM + paired regression, generator and critic updated every step, no GAN."""

    generator_every: int = 1
    gan: bool = False
    regression: RegressionOptions = field(default_factory=lambda: RegressionOptions(weight=0.25))


class DMD(Distiller):
    """DMD / DMD2 over one frame: the generator, one fake score (with DMD2's GAN head), the frozen teacher."""

    options_cls = DMDOptions

    def __init__(self, teacher, options: DMDOptions, conditions=None, judge=None, batch_size: int = 64, real=None,
                 regression_cache=None):
        super().__init__(teacher, options, conditions, judge, options.generator_timesteps, batch_size,
                         options.generator_input)
        self.fake = FakeScore.from_teacher(teacher.unet, teacher.schedule, gan_head=options.gan,
                                            share_frozen=self.shares_base(critic=True), gan_depths=options.gan_depths)
        if options.gan and real is None:
            raise ValueError("the GAN term needs real images (data.name digits, image_folder or dataset)")
        self.real = real
        self.regression = paired_regression(teacher, self.conditions, options.regression, regression_cache)
        T = teacher.schedule.num_train_timesteps
        # [dm_t_min T, dm_t_max T] inclusive: DMD2 samples t in [20, 980]
        self.dm_range = (round(options.dm_t_min * T), min(round(options.dm_t_max * T), T - 1) + 1)
        self.gan_range = (0, max(1, round(options.gan_t_max * T)))
        self._fresh: tuple[torch.Tensor, Condition] | None = None  # the generator step's sample, reused by the critic
        self.gan_augment = augment_ops(options.gan_augment)
        self.step = 0  # the training step (begin_step): lazy R1 runs on its multiples of gan_r1_every

    def updates(self) -> list[Update]:
        o = self.options
        return [Update("generator", self.generator, self.generator_loss, o.generator_optimizer, o.generator_every,
                       o.generator_ema),
                Update("critic", self.fake, self.critic_loss, o.critic_optimizer)]

    def begin_step(self, step: int) -> dict[str, float]:
        self.step = step
        return {}

    def gan_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) the discriminator reads: x noised at t ~ U[0, gan_t_max T) (DMD2's `--diffusion_gan`), or with
        gan_t_max 0 the clean x itself at t = 0 (DMD2 without it: sd_guidance.py `compute_cls_logits`).

        `gan_augment`'s DiffAugment ops act on the clean x (latents for a latent model) before the noise, so that
        x_t stays a noised sample of the augmented data."""
        x = diff_augment(x, self.gan_augment)
        t = sample_timesteps(x.shape[0], *self.gan_range, self.device)
        if self.options.gan_t_max == 0:
            return x, t
        return self.teacher.schedule.add_noise(x, torch.randn_like(x), t), t

    # --- generator ----------------------------------------------------------------------------------------------
    def _generator_sample(self, generator) -> tuple[torch.Tensor, Condition]:
        """x = G(z, c); multi-step generators train at a random step after backward simulation without grad."""
        x, _, condition = self.draw(generator, step=int(torch.randint(0, len(self.generator.timesteps), ())))
        return x, condition

    def generator_loss(self, generator) -> LossOutput:
        x, condition = self._generator_sample(generator)
        self._fresh = (x.detach(), condition)
        t = sample_timesteps(x.shape[0], *self.dm_range, self.device)
        x_t = self.teacher.schedule.add_noise(x.detach(), torch.randn_like(x), t)
        with torch.no_grad():
            mu_real = self.teacher.x0(x_t, t, condition)
            mu_fake = self.fake(x_t, t, condition)
        loss_dm = distribution_matching_loss(x, mu_real, mu_fake).mean()
        loss, logs = loss_dm, {"dm": loss_dm.item()}
        if self.options.gan:
            x_gan, t_gan = self.gan_input(x)
            logits = call_frozen(self.fake, x_gan, t_gan, condition, output="logits")
            loss_gan = gan_generator_loss(logits).mean()
            loss = loss + self.options.gan_generator_weight * loss_gan
            logs["gan"] = loss_gan.item()
        out = LossOutput(loss, logs)
        return self.regression.add_to(out, generator) if self.regression is not None else out

    # --- critic -------------------------------------------------------------------------------------------------
    def critic_loss(self, fake) -> LossOutput:
        if self._fresh is not None:
            x, condition = self._fresh
            self._fresh = None
        else:
            with torch.no_grad():
                x, condition = self._generator_sample(self.generator)
        raw = functools.partial(fake, output="raw")
        loss_dsm = denoising_loss(raw, self.teacher.schedule, x, condition).mean()
        loss, logs = loss_dsm, {"denoising": loss_dsm.item()}
        if self.options.gan:
            real, real_condition = self.real.sample(x.shape[0], self.device)
            fake_logits = fake(*self.gan_input(x), condition, output="logits")
            real_t, real_time = self.gan_input(real)
            if self._r1_now():
                real_logits, penalty = self._real_logits_and_r1(fake, real_t, real_time, real_condition)
                r1_weight = self.options.gan_critic_weight * self.options.gan_r1_every * self.options.gan_r1_gamma / 2
                loss = loss + r1_weight * penalty
                logs["r1"] = penalty.item()
            else:
                real_logits = fake(real_t, real_time, real_condition, output="logits")
            loss_d = gan_discriminator_loss(fake_logits, real_logits).mean()
            loss = loss + self.options.gan_critic_weight * loss_d
            logs.update(gan_d=loss_d.item(), d_real=real_logits.mean().item(), d_fake=fake_logits.mean().item())
        return LossOutput(loss, logs)

    def _r1_now(self) -> bool:
        o = self.options
        return o.gan_r1_gamma > 0 and self.step % o.gan_r1_every == 0

    def _real_logits_and_r1(self, fake, real_t: torch.Tensor, t: torch.Tensor,
                            condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """D(real_t) and R1's mean ||grad_{real_t} D(real_t)||^2 from one pass (a double backward through the
        critic's network under attention that allows it)."""
        if is_sharded(fake):
            raise UserInputError("gan_r1_gamma > 0 is not supported under FSDP: its double backward through a "
                                 "sharded critic is untested; train with DDP or set options.gan_r1_gamma=0")
        real_t = real_t.detach().requires_grad_(True)
        with differentiable_twice(fake):
            logits = fake(real_t, t, condition, output="logits")
            penalty = r1_penalty(logits, real_t).mean()
        return logits, penalty
