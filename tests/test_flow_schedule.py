"""The flow schedule contract (rectified flow on a FlowMatchEulerDiscreteScheduler's training grid), recomputed."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from onestep.models.schedules import FlowSchedule, VPSchedule, schedule_of


def test_static_shift_is_the_schedulers_own_training_sigmas():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = schedule_of(scheduler)
    assert isinstance(schedule, FlowSchedule)
    # diffusers keeps its shifted training sigmas noisiest first
    assert torch.allclose(schedule.sigmas, scheduler.sigmas.double().flip(0), atol=1e-6)
    s = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert torch.allclose(schedule.sigmas, 3 * s / (1 + 2 * s), atol=1e-12)


def test_dynamic_shift_follows_the_image_sequence_length():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    base = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    for seq_len in (256, 1024, 4096):
        schedule = FlowSchedule.from_scheduler(scheduler, seq_len)
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        expected = torch.exp(torch.tensor(mu, dtype=torch.float64)) / (torch.exp(torch.tensor(mu)) + (1 / base - 1))
        assert torch.allclose(schedule.sigmas, expected, atol=1e-9)
        # what FluxPipeline's scheduler does with these sigmas at this mu
        scheduler.set_timesteps(sigmas=base.flip(0).numpy(), mu=mu)
        assert torch.allclose(schedule.sigmas, scheduler.sigmas[:-1].double().flip(0), atol=1e-6)
    low, high = (FlowSchedule.from_scheduler(scheduler, n).sigmas for n in (256, 4096))
    assert bool((high[:-1] > low[:-1]).all())  # longer sequences shift toward noise
    with pytest.raises(ValueError, match="sequence length"):
        FlowSchedule.from_scheduler(scheduler)


def test_alpha_sigma_noise_and_time_input():
    schedule = schedule_of(FlowMatchEulerDiscreteScheduler(shift=3.0))
    t = torch.tensor([0, 10, 500, 999])
    s = schedule.sigmas[t].float()
    assert torch.equal(schedule.sigma(t, 1), s)
    assert torch.allclose(schedule.alpha(t, 1), 1 - s)
    assert schedule.sigma(999, 1).item() == 1.0 and schedule.alpha(999, 1).item() == 0.0
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    expected = (1 - s).view(4, 1, 1, 1) * x0 + s.view(4, 1, 1, 1) * eps
    assert torch.allclose(schedule.add_noise(x0, eps, t), expected, atol=1e-6)
    assert torch.allclose(schedule.network_time(t), s * 1000)
    # diffusers' own forward process at the scheduler's timestep s * 1000
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps = scheduler.timesteps[999 - t]  # noisiest first
    assert torch.allclose(schedule.network_time(t), timesteps, rtol=1e-6)
    diffusers_x = scheduler.scale_noise(x0, timesteps, eps)
    assert torch.allclose(schedule.add_noise(x0, eps, t), diffusers_x, atol=1e-5)


def test_velocity_read_out_and_target():
    schedule = schedule_of(FlowMatchEulerDiscreteScheduler(shift=3.0))
    t = torch.tensor([0, 250, 700, 999])
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    x_t = schedule.add_noise(x0, eps, t)
    v = eps - x0
    assert torch.allclose(schedule.to_x0(v, x_t, t), x0, atol=1e-5)
    assert torch.allclose(schedule.to_x0(v, x_t, t), x_t - schedule.sigma(t) * v)
    assert torch.allclose(schedule.from_x0(x0, x_t, t), v, atol=1e-4)
    assert torch.allclose(schedule.x0_to_eps(x0, x_t, t)[:3], eps[:3], atol=1e-4)
    with pytest.raises(ValueError, match="velocities"):
        schedule.to_x0(v, x_t, t, "epsilon")


def test_ve_view():
    schedule = schedule_of(FlowMatchEulerDiscreteScheduler(shift=3.0))
    t = torch.tensor([0, 100, 900])
    s = schedule.sigmas[t]
    assert torch.allclose(schedule.ve_sigma(t).double(), (s / (1 - s)), rtol=1e-6)
    target = 2.5
    index = int(schedule.timestep_for_ve_sigma(target))
    ve = schedule.sigmas / (1 - schedule.sigmas)
    assert index == int((ve.log() - torch.log(torch.tensor(target, dtype=torch.float64))).abs().argmin())
    assert schedule.generator_timestep(2.5) == 999  # flow generators start from pure noise
    vp = VPSchedule(torch.linspace(0.999, 0.01, 1000))
    assert vp.generator_timestep(2.5) == int(vp.timestep_for_ve_sigma(2.5))
