"""Training a latent teacher's AutoencoderKL from images (`method: vae`): reconstruction + a small KL, as LDM does."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from onestep.training.updates import LossOutput, OptimizerConfig, Update


@dataclass
class VaeOptions:
    """`options:` of a VAE-training config."""

    vae: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL kwargs
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW
    kl_weight: float = 1.0e-6  # LDM's KL-f8 weight on the summed KL (Rombach et al. 2022, appendix G)
    centre_latents: bool = False  # export with the data's mean latent folded out (see `centre_latents`)
    export_dtype: str = "float32"  # the exported VAE's dtype

    def validate(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.optimizer.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-image summed L1 reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)), batch mean
    (LDM's autoencoder loss without its perceptual and adversarial terms)."""
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    rec = (reconstruction.float() - x).abs().flatten(1).sum(1).mean()
    kl = posterior.kl().mean()
    return rec + kl_weight * kl, {"rec_l1": rec.item() / x[0].numel(), "kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0, batch: int = 512) -> float:
    """1 / std of posterior samples of `images` (drawn from `seed`), how SD measured its 0.18215 on a batch: the
    diffusion model then sees unit-variance latents."""
    generator = torch.Generator(vae.device).manual_seed(seed)
    latents = torch.cat([vae.encode(images[i:i + batch]).latent_dist.sample(generator)
                         for i in range(0, len(images), batch)])
    return 1.0 / latents.float().std().item()


@torch.no_grad()
def centre_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Fold the data's mean latent m (per channel, of the posterior means of `images`) out of the latent space:
    quant_conv's bias -= m, post_quant_conv's bias += W_post m. decode(encode(x)) is unchanged exactly and stock
    diffusers loads the result (SD3 keeps such an offset outside the VAE as `shift_factor`; SD1.5's pipeline has no
    such field).

    Why: with SD's non-zero terminal SNR the model's input at t = T still carries sqrt(alpha_bar_T) x0, while
    samplers start from noise centred at 0; latents whose data mean is far from 0 then bias the colours (low
    frequencies) the teacher draws from pure noise (docs/t2i.md). Returns m.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("centre_latents needs an AutoencoderKL with quant_conv and post_quant_conv")
    channels = vae.config.latent_channels
    mean = torch.cat([vae.encode(images[i:i + batch].to(vae.device, vae.dtype)).latent_dist.mean
                      for i in range(0, len(images), batch)]).float().mean((0, 2, 3))
    vae.quant_conv.bias[:channels] -= mean.to(vae.dtype)
    post_weight = vae.post_quant_conv.weight.float().flatten(1)  # 1x1 conv: (C, C)
    vae.post_quant_conv.bias += (post_weight @ mean).to(vae.dtype)
    return mean


class VaeTraining:
    """x ~ data, one L1 + KL step; the exported AutoencoderKL carries the measured `scaling_factor`."""

    def __init__(self, options: VaeOptions, images: torch.Tensor, batch_size: int):
        self.options, self.images, self.batch_size = options, images, batch_size
        self.vae = AutoencoderKL(**options.vae)

    def updates(self) -> list[Update]:
        return [Update("vae", self.vae, self.loss, self.options.optimizer)]

    def loss(self, vae: torch.nn.Module) -> LossOutput:
        idx = torch.randint(0, self.images.shape[0], (self.batch_size,))
        loss, logs = vae_loss(vae, self.images[idx].to(self.vae.device), self.options.kl_weight)
        return LossOutput(loss, logs)

    def _eval_images(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return self.images[torch.randperm(len(self.images), generator=generator)[:1024]].to(self.vae.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        x = self._eval_images()
        reconstruction = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = (reconstruction - x).square().mean().item()
        psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # peak-to-peak range 2
        return {"rec_mse": mse, "psnr_db": psnr, "scaling_factor": self.exported_vae().config.scaling_factor}

    def exported_vae(self) -> AutoencoderKL:
        """A copy of the VAE as it is exported: centred if `options.centre_latents`, with `scaling_factor` measured
        on the 1024 fixed evaluation images."""
        vae = copy.deepcopy(self.vae).eval()
        if self.options.centre_latents:
            centre_latents(vae, self.images)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, self._eval_images()))
        return vae

    @torch.no_grad()
    def sample_images(self) -> torch.Tensor:
        """Originals above their reconstructions (uint8)."""
        from onestep.eval.quantize import to_uint8

        x = self._eval_images()[:32]
        reconstruction = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        return to_uint8(torch.cat([x, reconstruction]))

    def export_pipeline(self, out_dir: Path) -> None:
        """The AutoencoderKL folder (`save_pretrained`, safetensors) of `exported_vae` (what `evaluate` reports)."""
        from onestep.files import atomic_folder

        vae = self.exported_vae()
        with atomic_folder(out_dir) as tmp:
            vae.to(getattr(torch, self.options.export_dtype)).save_pretrained(tmp, safe_serialization=True)
