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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    kl_weight: float = 1.0e-6  # LDM's KL-f8 weight on the summed KL (Rombach et al. 2022, appendix G)
    export_dtype: str = "float32"

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
        return {"rec_mse": mse, "psnr_db": psnr, "scaling_factor": latent_scaling_factor(self.vae, x)}

    @torch.no_grad()
    def sample_images(self) -> torch.Tensor:
        """Originals above their reconstructions (uint8)."""
        from onestep.eval.quantize import to_uint8

        x = self._eval_images()[:32]
        reconstruction = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        return to_uint8(torch.cat([x, reconstruction]))

    def export_pipeline(self, out_dir: Path) -> None:
        """The AutoencoderKL folder (`save_pretrained`, safetensors), `scaling_factor` measured on the 1024 fixed
        evaluation images (what `evaluate` reports)."""
        from onestep.export import atomic_folder

        vae = copy.deepcopy(self.vae).eval()
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, self._eval_images()))
        with atomic_folder(out_dir) as tmp:
            vae.to(getattr(torch, self.options.export_dtype)).save_pretrained(tmp, safe_serialization=True)
