"""Noise schedules read from diffusers schedulers, and the conversions between parameterisations.

The contract every network and distiller goes through (`Schedule`): an integer time index t in {0..T-1} of the
teacher's training grid (T = num_train_timesteps; larger t = noisier), x_t = alpha_t x0 + sigma_t eps,
`network_time(t)` the timestep the network takes there (as its diffusers pipeline passes it), every network read out
as an x0-prediction (`to_x0`), uniform t over the grid as the training-time distribution, and the VE view
sigma_VE = sigma_t / alpha_t (x_t / alpha_t = x0 + sigma_VE eps). Two families satisfy it:

- VP discrete time (`VPSchedule`, DDPM-family schedulers): alpha_t = sqrt(alphas_cumprod[t]),
  sigma_t = sqrt(1 - alphas_cumprod[t]), the network takes t itself; epsilon / v_prediction / sample outputs.
- Rectified flow (`FlowSchedule`, `FlowMatchEulerDiscreteScheduler`): alpha_t = 1 - s_t, sigma_t = s_t, where s_t
  is the scheduler's training sigma of grid point t: s = (t + 1) / T shifted toward noise as the scheduler shifts it
  (SD3's static `shift`, FLUX's dynamic shift by image sequence length), so uniform t over the grid is the shifted
  time distribution. The network takes s_t * T (what SD3's / FLUX's pipelines pass) and predicts the velocity
  v = eps - x0, so x0 = x_t - s_t v.

The conversions run in float32 (or float64 when asked) whatever the network dtype.
"""

from __future__ import annotations

import torch

from onestep.pipelines.pipeline_onestep import flow_sigmas


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION = "flow"  # a velocity v = eps - x0


class Schedule:
    """alpha_t, sigma_t tables (float64, indexed by the grid time t) and what follows from them alone."""

    prediction_type: str
    _alphas: torch.Tensor
    _sigmas: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return self._alphas.numel()

    def _gather(self, values: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t)
        out = values.to(t.device)[t.long()].to(dtype)
        return out.reshape(out.shape + (1,) * (ndim - out.dim()))

    def alpha(self, t: torch.Tensor, ndim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_t, shaped to broadcast over (B, C, H, W)."""
        return self._gather(self._alphas, t, ndim, dtype)

    def sigma(self, t: torch.Tensor, ndim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma_t, shaped to broadcast over (B, C, H, W)."""
        return self._gather(self._sigmas, t, ndim, dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, computed in float32."""
        alpha, sigma = self.alpha(t, x0.dim()), self.sigma(t, x0.dim())
        return alpha * x0.float() + sigma * noise.float()

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input of the network at grid time t."""
        raise NotImplementedError

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              prediction_type: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        raise NotImplementedError

    def x0_to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - alpha_t x0) / sigma_t."""
        alpha, sigma = self.alpha(t, x_t.dim()), self.sigma(t, x_t.dim())
        return (x_t.float() - alpha * x0.float()) / sigma.clamp_min(1e-8)

    # --- VE view ----------------------------------------------------------------------------------------------
    def _ve_sigmas(self) -> torch.Tensor:
        return self._sigmas / self._alphas

    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """VE noise level sigma_t / alpha_t of grid time t (x_t / alpha_t = x0 + ve_sigma * eps)."""
        return self._ve_sigmas()[torch.as_tensor(t).long().cpu()].float()

    def timestep_for_ve_sigma(self, ve_sigma: float | torch.Tensor) -> torch.Tensor:
        """The grid time whose VE sigma is nearest `ve_sigma` in log scale (e.g. SiD's sigma_min = 0.14)."""
        target = torch.as_tensor(ve_sigma, dtype=torch.float64).reshape(-1, 1)
        return (self._ve_sigmas().log().reshape(1, -1) - target.log()).abs().argmin(dim=1).squeeze(0)

    def generator_timestep(self, ve_sigma: float) -> int:
        """Where a generator that starts at VE sigma `ve_sigma` (SiD's sigma_init) reads out."""
        return int(self.timestep_for_ve_sigma(ve_sigma))


class VPSchedule(Schedule):
    """alpha_t, sigma_t of a DDPM/DDIM-family scheduler (anything with `alphas_cumprod` or its betas config)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self._alphas, self._sigmas = self.alphas_cumprod.sqrt(), (1 - self.alphas_cumprod).sqrt()

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """Read from a diffusers scheduler instance (DDPM, DDIM, Euler, LCM, ...: all expose `alphas_cumprod`)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod (a VP scheduler is needed)")
        return cls(torch.as_tensor(scheduler.alphas_cumprod), scheduler.config.get("prediction_type", "epsilon"))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """A diffusers UNet takes the integer grid time itself."""
        return torch.as_tensor(t).long()

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

    def _ve_sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()


class FlowSchedule(Schedule):
    """Rectified flow on the training grid of a `FlowMatchEulerDiscreteScheduler` (see the module docstring).

    `sigmas` (T,) increasing in t, the last one 1 (pure noise)."""

    prediction_type = FLOW_PREDICTION

    def __init__(self, sigmas: torch.Tensor):
        sigmas = sigmas.detach().to(torch.float64).cpu()
        if sigmas.dim() != 1 or not bool((sigmas[1:] > sigmas[:-1]).all()) or not 0 < sigmas[0] <= sigmas[-1] <= 1:
            raise ValueError("flow sigmas must increase within (0, 1]")
        self.sigmas = sigmas
        self._alphas, self._sigmas = 1 - sigmas, sigmas

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int | None = None) -> FlowSchedule:
        """The training sigmas of a `FlowMatchEulerDiscreteScheduler`, shifted as its pipeline shifts them at
        `image_seq_len` tokens (FLUX's dynamic shifting needs it; SD3's static shift does not)."""
        return cls(flow_sigmas(scheduler, image_seq_len))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """s_t * T as a float: the `timestep` SD3's and FLUX's pipelines pass (FLUX's divides it by 1000 again)."""
        t = torch.as_tensor(t)
        return self._gather(self.sigmas * self.num_train_timesteps, t, t.dim(), torch.float32)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              prediction_type: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x0 = x_t - s_t v from a velocity v = eps - x0."""
        self._check(prediction_type)
        return x_t.to(dtype) - self.sigma(t, x_t.dim(), dtype) * model_output.to(dtype)

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        """The velocity whose x0 read-out is `x0`: v = (x_t - x0) / s_t (= eps - x0 on x_t = (1-s) x0 + s eps)."""
        self._check(prediction_type)
        return (x_t.float() - x0.float()) / self.sigma(t, x_t.dim()).clamp_min(1e-8)

    def _check(self, prediction_type: str | None) -> None:
        if prediction_type not in (None, FLOW_PREDICTION):
            raise ValueError(f"a flow schedule reads out velocities, not {prediction_type!r}")

    def generator_timestep(self, ve_sigma: float) -> int:
        """T - 1, whatever `ve_sigma`: flow pipelines sample from pure noise at s = 1 (alpha = 0), the only grid
        point whose input carries no signal; a generator started lower would need signal it cannot have."""
        return self.num_train_timesteps - 1


def schedule_of(scheduler, image_seq_len: int | None = None) -> Schedule:
    """The schedule of a diffusers scheduler: flow for `FlowMatchEulerDiscreteScheduler`, else VP."""
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return FlowSchedule.from_scheduler(scheduler, image_seq_len)
    return VPSchedule.from_scheduler(scheduler)
