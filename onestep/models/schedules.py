"""VP noise schedule read from a diffusers scheduler, and the conversions between parameterisations.

Convention used everywhere in onestep: discrete time t in {0..T-1}, x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]); every network is read out as an
x0-prediction. The conversions run in float32 (or float64 when asked) whatever the network dtype.
"""

from __future__ import annotations

import torch


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class VPSchedule:
    """alpha_t, sigma_t of a DDPM/DDIM-family scheduler (anything with `alphas_cumprod` or its betas config)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """Read from a diffusers scheduler instance (DDPM, DDIM, Euler, LCM, ...: all expose `alphas_cumprod`)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod (a VP scheduler is needed)")
        return cls(torch.as_tensor(scheduler.alphas_cumprod), scheduler.config.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _gather(self, values: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t)
        out = values.to(t.device)[t.long()].to(dtype)
        return out.reshape(out.shape + (1,) * (ndim - out.dim()))

    def alpha(self, t: torch.Tensor, ndim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_t = sqrt(alphas_cumprod[t]), shaped to broadcast over (B, C, H, W)."""
        return self._gather(self.alphas_cumprod.sqrt(), t, ndim, dtype)

    def sigma(self, t: torch.Tensor, ndim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma_t = sqrt(1 - alphas_cumprod[t])."""
        return self._gather((1 - self.alphas_cumprod).sqrt(), t, ndim, dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, computed in float32."""
        alpha, sigma = self.alpha(t, x0.dim()), self.sigma(t, x0.dim())
        return alpha * x0.float() + sigma * noise.float()

    # --- parameterisations -------------------------------------------------------------------------------------
    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              prediction_type: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x0 from an epsilon / v_prediction / sample output (Salimans & Ho 2022, eq. for v: x0 = a x_t - s v)."""
        kind = prediction_type or self.prediction_type
        out, x = model_output.to(dtype), x_t.to(dtype)
        alpha, sigma = self.alpha(t, x.dim(), dtype), self.sigma(t, x.dim(), dtype)
        if kind == "sample":
            return out
        if kind == "v_prediction":
            return alpha * x - sigma * out
        if kind == "epsilon":
            # alpha_t -> 0 at a zero-terminal-SNR t = T-1: the epsilon read-out is undefined there.
            return (x - sigma * out) / alpha.clamp_min(1e-8)
        raise ValueError(f"unknown prediction_type {kind!r}")

    def x0_to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - alpha_t x0) / sigma_t."""
        alpha, sigma = self.alpha(t, x_t.dim()), self.sigma(t, x_t.dim())
        return (x_t.float() - alpha * x0.float()) / sigma.clamp_min(1e-8)

    def x0_to_v(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x0."""
        alpha, sigma = self.alpha(t, x_t.dim()), self.sigma(t, x_t.dim())
        return alpha * self.x0_to_eps(x0, x_t, t) - sigma * x0.float()

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        """The network target of the given parameterisation whose x0-read-out is `x0` (inverse of `to_x0`)."""
        kind = prediction_type or self.prediction_type
        if kind == "sample":
            return x0.float()
        if kind == "epsilon":
            return self.x0_to_eps(x0, x_t, t)
        if kind == "v_prediction":
            return self.x0_to_v(x0, x_t, t)
        raise ValueError(f"unknown prediction_type {kind!r}")

    # --- VE view ----------------------------------------------------------------------------------------------
    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """VE noise level sqrt((1 - abar_t) / abar_t) of VP timestep t (x_t / alpha_t = x0 + ve_sigma * eps)."""
        abar = self.alphas_cumprod[torch.as_tensor(t).long().cpu()]
        return ((1 - abar) / abar).sqrt().float()

    def timestep_for_ve_sigma(self, ve_sigma: float | torch.Tensor) -> torch.Tensor:
        """The VP timestep whose VE sigma is nearest `ve_sigma` (e.g. SiD's sigma_init = 2.5)."""
        all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        target = torch.as_tensor(ve_sigma, dtype=torch.float64).reshape(-1, 1)
        return (all_sigmas.log().reshape(1, -1) - target.log()).abs().argmin(dim=1).squeeze(0)
