"""Adversarial Score identity Distillation (Zhou et al. 2024, arXiv 2410.14919): SiDA, and SiD²A from a SiD run.

SiD whose fake score's encoder doubles as a discriminator between real images and generator samples, both noised
(official code: mingyuanzhou/SiD, branch sida, sida_training/sida_loss.py). Per step (1:1 alternation):
  critic:    t, eps on the critic's range; x_t = alpha_t sg(G(z)) + sigma_t eps, r_t = alpha_t x_real + sigma_t eps
             (the same t and eps: `real_images + n` in the official code)
             L_psi = mean_b [DSM_b + w_D / (CHW k(t_b)) * 1/2 mean[softplus(-D(r_t)) + softplus(D(x_t))]]
             (the paper's eq. 10: the fake score's loss plus the discriminator's, D read from the same pass as DSM)
  generator: x_g = G(sigma_init z), x_t = alpha_t x_g + sigma_t eps on the generator range,
             L_theta = L_SiD(x_g) + w_G * CHW * omega * mean_b softplus(-clamp(D(x_t), -10, 10))
             (eq. 11: the SiD loss of eq. 9 plus the adversarial one, D on the same x_t and pass as mu_fake)
with D(x) the head on the fake score's encoder (mid-block) features: by default the official parameter-free channel
mean, one logit per position; omega SiD's normaliser. Weights: the official loss scalings, w_G = lsg_gan / lsg =
0.01 / 100 and w_D = lsd / ls = 1; the official BCE averages over the batch before the per-sample weights multiply
it, hence the batch means. The official critic loss weights both terms by EDM's lambda(sigma):
lambda(sigma) [sum_CHW (x0_psi - x)^2 + w_D BCE / 2] (sida_loss.py lines 115 and 123). Our DSM is the teacher's own
parameterisation averaged over CHW, DSM = mean_CHW (x0_psi - x)^2 / k(t) with k(t) the x0 error per unit of it
(sigma^2/alpha^2 for epsilon, sigma^2 for v, 1 for x0; `inverse_x0_error_scale` is 1 / k), so the discriminator
term carries 1 / (CHW k(t)): at every t the two terms stand in the official ratio. As officially: alpha 1, no
clipping of the generator's gradient. Differences: docs/faithfulness.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.distillers.sid import SiD, SiDOptions, sid_loss, sid_normaliser
from onestep.models.conditioning import Condition
from onestep.models.critics import DEFAULT_DEPTHS, GAN_HEADS, FakeScore, gan_discriminator_loss, gan_generator_loss
from onestep.models.denoising import denoising_loss, sample_timesteps
from onestep.models.unet import call_frozen
from onestep.training.updates import LossOutput, OptimizerConfig


@dataclass
class SiDAOptions(SiDOptions):
    """`options:` of a sida config: SiD's, plus the adversarial term's (0 and 0 is SiD exactly)."""

    gan_generator_weight: float = 1e-4  # w_G: the official lsg_gan / lsg = 0.01 / 100
    gan_critic_weight: float = 1.0  # w_D: the official lsd / ls
    gan_head: str = "mean"  # mean: the official channel mean of the encoder features; bottleneck: DMD2's head
    alpha: float = 1.0  # every official SiDA / SiD²A script runs --alpha 1 (SiD's default is 1.2)
    # no generator gradient clipping (the official loop clips only the fake score's)
    generator_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=None))
    # a flow transformer's head reads the blocks at these fractional depths (a UNet: its encoder's last features)
    gan_depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))

    def validate(self) -> None:
        super().validate()
        if self.gan_generator_weight < 0 or self.gan_critic_weight < 0:
            raise ValueError("gan_generator_weight and gan_critic_weight must be >= 0")
        if not self.gan_depths or any(not 0 < d <= 1 for d in self.gan_depths):
            raise ValueError(f"gan_depths must be fractions in (0, 1], got {self.gan_depths}")
        if self.gan_head not in GAN_HEADS:
            raise ValueError(f"gan_head must be one of {', '.join(GAN_HEADS)}, got {self.gan_head!r}")
        if self.fake_guidance != 1.0 or self.fake_train_guidance != 1.0:
            raise ValueError("sida reads the discriminator from the unguided fake score: fake_guidance and "
                             "fake_train_guidance must be 1")


def inverse_x0_error_scale(schedule, t: torch.Tensor) -> torch.Tensor:
    """1 / k(t), with k(t) = |x0 error|^2 per unit of the squared error of the teacher's own output (its denoising
    loss): alpha^2/sigma^2 for epsilon, 1/sigma^2 for v, 1 for x0 (0, not undefined, at a zero-terminal-SNR T-1)."""
    alpha, sigma = schedule.alpha(t, 1), schedule.sigma(t, 1)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return (alpha / sigma).square()
    if kind == "v_prediction":
        return sigma.square().reciprocal()
    return torch.ones_like(alpha)


class SiDA(SiD):
    """SiD with the fake score's encoder as a discriminator (SiD²A: start with init_generator= a SiD run's export)."""

    options_cls = SiDAOptions

    def __init__(self, teacher, options: SiDAOptions, conditions=None, judge=None, batch_size: int = 64, real=None,
                 regression_cache=None, **_unused):
        super().__init__(teacher, options, conditions, judge, batch_size, regression_cache)
        if real is None:
            raise ValueError("sida's discriminator needs real images (data.name digits, image_folder or dataset)")
        self.real = real
        self.fake = FakeScore(self.fake.unet, teacher.schedule, gan_head=options.gan_head,
                              gan_depths=options.gan_depths)
        self._logits: torch.Tensor | None = None  # the generator pass's D(x_t), read with mu_fake

    def frozen_fake(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        mu_fake, self._logits = call_frozen(self.fake, x_t, t, condition, output="x0+logits",
                                            checkpoint=self.options.gradient_checkpointing)
        return mu_fake

    def generator_loss(self, generator) -> LossOutput:
        x_g, _, condition = self.draw(generator)
        mu_real, mu_fake = self.score_pair(x_g, condition, condition)
        logits, self._logits = self._logits, None
        loss_sid = sid_loss(x_g, mu_real, mu_fake, self.options.alpha)
        chw = x_g[0].numel()
        adversarial = gan_generator_loss(logits.clamp(-10, 10)).mean()
        loss_gan = chw * sid_normaliser(x_g, mu_real).flatten() * adversarial
        loss = (loss_sid + self.options.gan_generator_weight * loss_gan).mean()
        return LossOutput(loss, {"sid": loss_sid.mean().item(), "gan": adversarial.item(),
                                 "score_gap": (mu_real - mu_fake).abs().mean().item()})

    def critic_loss(self, fake) -> LossOutput:
        if self.options.gan_critic_weight == 0:  # SiD's step exactly: no real images drawn, no discriminator pass
            return super().critic_loss(fake)
        with torch.no_grad():
            x_g, _, condition = self.draw(self.generator)
        schedule, batch = self.teacher.schedule, x_g.shape[0]
        t = self.critic_timesteps(batch)
        if t is None:
            t = sample_timesteps(batch, 0, schedule.num_train_timesteps, self.device)
        noise = torch.randn_like(x_g)
        seen = {}

        def raw(x_t, t, c):
            out, seen["fake"] = fake(x_t, t, c, output="raw+logits")
            return out

        loss_dsm = denoising_loss(raw, schedule, x_g, condition, t, noise).mean()
        real, real_condition = self.real.sample(batch, self.device)
        real_logits = fake(schedule.add_noise(real, noise, t), t, real_condition, output="logits")
        loss_d = 0.5 * gan_discriminator_loss(seen["fake"], real_logits).mean()
        weight = inverse_x0_error_scale(schedule, t).mean() / x_g[0].numel()
        loss = loss_dsm + self.options.gan_critic_weight * weight * loss_d
        return LossOutput(loss, {"denoising": loss_dsm.item(), "gan_d": loss_d.item(),
                                 "d_real": real_logits.mean().item(), "d_fake": seen["fake"].mean().item()})
