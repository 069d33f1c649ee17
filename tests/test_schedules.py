import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from onestep.models.schedules import VPSchedule


@pytest.fixture(params=["linear", "scaled_linear", "squaredcos_cap_v2"])
def diffusers_scheduler(request):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=request.param)


def test_alpha_sigma_match_alphas_cumprod(diffusers_scheduler):
    sched = VPSchedule.from_scheduler(diffusers_scheduler)
    t = torch.tensor([0, 17, 500, 999])
    abar = diffusers_scheduler.alphas_cumprod[t].double()
    assert torch.allclose(sched.alpha(t, 1).double(), abar.sqrt(), atol=1e-7)
    assert torch.allclose(sched.sigma(t, 1).double(), (1 - abar).sqrt(), atol=1e-7)
    assert torch.allclose(sched.alpha(t, 1) ** 2 + sched.sigma(t, 1) ** 2, torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_reads_any_ddpm_family_scheduler(cls):
    s = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="v_prediction")
    sched = VPSchedule.from_scheduler(s)
    assert sched.prediction_type == "v_prediction"
    assert torch.allclose(sched.alphas_cumprod.float(), s.alphas_cumprod.float())


def test_add_noise_equals_diffusers(diffusers_scheduler):
    sched = VPSchedule.from_scheduler(diffusers_scheduler)
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 600, 999])
    expected = diffusers_scheduler.add_noise(x0, eps, t)
    assert torch.allclose(sched.add_noise(x0, eps, t), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_conversions_are_exact_inverses(kind):
    s = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    sched = VPSchedule.from_scheduler(s)
    x0, eps, t = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.tensor([1, 50, 300, 600, 900, 999])
    x_t = sched.add_noise(x0, eps, t)
    target = {"epsilon": eps, "v_prediction": sched.alpha(t) * eps - sched.sigma(t) * x0, "sample": x0}[kind]
    assert torch.allclose(sched.from_x0(x0, x_t, t), target, atol=2e-3)
    # x0 read-out of the exact target gives back x0 (epsilon at t=999 of linear beta divides by alpha ~ 0.006)
    assert torch.allclose(sched.to_x0(target, x_t, t), x0, atol=1e-3 if kind == "epsilon" else 1e-5)


def test_v_prediction_matches_diffusers_get_velocity():
    s = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    sched = VPSchedule.from_scheduler(s)
    x0, eps, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([3, 400, 998])
    assert torch.allclose(sched.x0_to_v(x0, sched.add_noise(x0, eps, t), t), s.get_velocity(x0, eps, t), atol=1e-4)


def test_zero_terminal_snr_read_out_is_well_conditioned():
    s = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched = VPSchedule.from_scheduler(s)
    t = torch.tensor([999])
    assert sched.alpha(t).item() == 0.0 and sched.sigma(t).item() == 1.0
    z, v = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    assert torch.equal(sched.to_x0(v, z, t), -v)  # x0 = alpha z - sigma v = -v


def test_ve_sigma_round_trip():
    sched = VPSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    t = sched.timestep_for_ve_sigma(2.5)
    assert abs(sched.ve_sigma(t).item() - 2.5) < 0.05
    assert 400 < int(t) < 480  # METHODS.md: t ~ 440 for a linear-beta DDPM
    abar = sched.alphas_cumprod[t]
    assert torch.isclose(sched.ve_sigma(t).double(), ((1 - abar) / abar).sqrt(), atol=1e-6)


def test_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        VPSchedule(torch.linspace(0.99, 0.01, 10), "score")
