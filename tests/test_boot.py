"""BOOT: the signal-space DDIM step against diffusers, the loss against its formula and the exact trajectory, the
stop-gradient, the signal read-out of the exported pipeline, and a CLI smoke run."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from onestep.distillers import BOOTOptions, build_distiller
from onestep.distillers.boot import bootstrap_weight, ddim_signal_step, signal_step_size, training_grid
from onestep.models.conditioning import Condition
from onestep.models.teacher import Teacher
from onestep.models.unet import unet_forward
from onestep.pipelines import OneStepPipeline
from tests.conftest import scheduler, teacher_input_grads, tiny_unet, train_steps_keep_teacher


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "boot.yaml"
T_LAST = 999
# the 3-step training grid round(linspace(0, 999, 4)): consecutive pairs, one per sample of a batch of three
GRID_T, GRID_S = torch.tensor([999, 666, 333]), torch.tensor([666, 333, 0])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(-1, 1) / 2 + 0.5).float()


def ddim(kind: str = "v_prediction", zero_snr: bool = True, steps: int = 3) -> DDIMScheduler:
    """diffusers' DDIM on the same betas; `steps` sets its step length T // steps (prev_timestep = t - that)."""
    sched = DDIMScheduler.from_config(scheduler(kind, zero_snr).config, clip_sample=False)
    sched.set_timesteps(steps)
    return sched


def boot_distiller(**options):
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    defaults = dict(num_grid_steps=3, boundary_batch_fraction=1.0)
    return build_distiller("boot", teacher, BOOTOptions(**{**defaults, **options}), batch_size=3)


def batch() -> tuple[torch.Tensor, Condition]:
    torch.manual_seed(1)
    return torch.randn(3, 1, 8, 8), Condition(class_labels=torch.tensor([0, 1, 2]))


class Lookup(nn.Module):
    """A stand-in student: y_t of given trajectories, found by the noise rows it is called with."""

    def __init__(self, noise: torch.Tensor, signals: dict[int, torch.Tensor]):
        super().__init__()
        self.noise, self.signals = noise, signals

    def forward(self, noise: torch.Tensor, condition: Condition, t: torch.Tensor) -> torch.Tensor:
        rows = (noise.flatten(1)[:, None] == self.noise.flatten(1)[None]).all(-1).float().argmax(1)
        t = torch.as_tensor(t).expand(noise.shape[0])
        return torch.stack([self.signals[int(tb)][row] for tb, row in zip(t, rows, strict=True)])


class Spy(nn.Module):
    """Records the timesteps of every student call and whether it could carry a gradient."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student, self.calls = student, []

    def forward(self, noise, condition, t):
        self.calls.append((torch.as_tensor(t).clone(), torch.is_grad_enabled()))
        return self.student(noise, condition, t)


# --- the exact DDIM step in signal space -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, zero_snr", [("v_prediction", True), ("epsilon", False)])
@pytest.mark.parametrize("t, s", [(999, 799), (600, 400), (200, 0)])
@torch.no_grad()
def test_signal_space_ddim_step_equals_diffusers_ddim_step(kind, zero_snr, t, s):
    sched = ddim(kind, zero_snr, steps=5)  # step length 200: prev_timestep = s
    teacher = Teacher(tiny_unet(num_classes=3), sched)
    schedule, condition = teacher.schedule, Condition(class_labels=torch.tensor([0, 2]))
    y_t, eps = torch.randn(2, 1, 8, 8, generator=seeded(1)), torch.randn(2, 1, 8, 8, generator=seeded(2))
    tt, ss = torch.full((2,), t), torch.full((2,), s)
    x_t = schedule.add_noise(y_t, eps, tt)
    x_s = sched.step(unet_forward(teacher.unet, x_t, tt, condition), t, x_t, eta=0.0).prev_sample
    y_s = ddim_signal_step(y_t, teacher.x0(x_t, tt, condition), signal_step_size(schedule, tt, ss))
    assert torch.allclose(schedule.add_noise(y_s, eps, ss), x_s, atol=1e-5, rtol=1e-4)


def test_step_size_is_one_at_zero_terminal_snr_and_finite_on_fine_grids():
    schedule = Teacher(tiny_unet(), scheduler()).schedule
    assert signal_step_size(schedule, torch.tensor([T_LAST]), torch.tensor([500])).item() == 1.0
    grid = training_grid(999, 1000)
    assert grid.tolist() == list(range(1000))
    step = signal_step_size(schedule, grid[1:], grid[:-1])
    assert torch.isfinite(step).all() and (step > 0).all() and (step <= 1).all()
    assert training_grid(3, 1000).tolist() == [0, 333, 666, 999]


# --- the loss --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_ddim_trajectory(teacher: Teacher, noise: torch.Tensor, condition: Condition) -> dict[int, torch.Tensor]:
    """y_t of diffusers' 3-step DDIM from x_999 = eps (zero terminal SNR) on the grid 999, 666, 333, 0."""
    sched, abar = ddim(steps=3), teacher.scheduler.alphas_cumprod
    x, signals = noise, {T_LAST: teacher.x0(noise, torch.tensor(T_LAST), condition)}
    for t in GRID_T.tolist():
        x = sched.step(unet_forward(teacher.unet, x, torch.tensor(t), condition), t, x).prev_sample
        prev = t - 333
        signals[prev] = (x - (1 - abar[prev]).sqrt() * noise) / abar[prev].sqrt()
    return signals


def test_the_teachers_exact_trajectory_has_zero_loss_a_perturbed_one_does_not():
    boot = boot_distiller()
    noise, condition = batch()
    signals = teacher_ddim_trajectory(boot.teacher, noise, condition)
    exact = boot.losses(Lookup(noise, signals), noise, condition, GRID_T, GRID_S)
    assert exact.loss.item() < 1e-9 and exact.logs["boundary"] < 1e-12
    perturbed = boot.losses(Lookup(noise, {**signals, 333: signals[333] + 0.05}), noise, condition, GRID_T, GRID_S)
    assert perturbed.logs["bootstrap"] > 1e-4


def test_weightings():
    step = torch.tensor([1.0, 0.5, 0.05]).reshape(3, 1, 1, 1)
    assert bootstrap_weight(step, "none", 100.0).tolist() == [1, 1, 1]
    assert torch.allclose(bootstrap_weight(step, "inverse_delta_squared", 100.0), torch.tensor([1.0, 4.0, 400.0]))
    assert torch.allclose(bootstrap_weight(step, "clipped", 100.0), torch.tensor([1.0, 4.0, 100.0]))


@pytest.mark.parametrize("weighting, clip", [("inverse_delta_squared", 100.0), ("clipped", 1.2), ("none", 100.0)])
def test_loss_and_gradient_equal_the_formula_with_a_detached_noisier_branch(weighting, clip):
    boot = boot_distiller(loss_weighting=weighting, weight_clip=clip, boundary_weight=0.3)
    noise, condition = batch()
    spy = Spy(boot.generator)
    out = boot.losses(spy, noise, condition, GRID_T, GRID_S)
    out.loss.backward()
    grads = [p.grad.clone() for p in boot.generator.parameters()]
    boot.generator.zero_grad(set_to_none=True)
    # the formula, written out: delta' in float64 from alphas_cumprod, x_T = eps at zero terminal SNR
    abar = boot.teacher.scheduler.alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    delta = (1 - sigma[GRID_S] * alpha[GRID_T] / (alpha[GRID_S] * sigma[GRID_T])).float().reshape(3, 1, 1, 1)
    g, f = boot.generator, boot.teacher.x0
    with torch.no_grad():
        y_t = g(noise, condition, GRID_T)
        x_t = alpha[GRID_T].float().reshape(3, 1, 1, 1) * y_t + sigma[GRID_T].float().reshape(3, 1, 1, 1) * noise
        target = y_t + delta * (f(x_t, GRID_T, condition) - y_t)
        boundary = f(noise, torch.tensor(T_LAST), condition)
    weight = {"none": torch.ones(3), "inverse_delta_squared": delta.flatten() ** -2,
              "clipped": (delta.flatten() ** -2).clamp_max(clip)}[weighting]
    loss_bs = (weight * (g(noise, condition, GRID_S) - target).square().mean(dim=(1, 2, 3))).mean()
    loss_bc = (g(noise, condition, torch.tensor(T_LAST)) - boundary).square().mean()
    manual = loss_bs + 0.3 * loss_bc
    manual.backward()
    assert weighting != "clipped" or weight.max() == clip  # the clip is active in this case
    assert torch.allclose(out.loss, manual, rtol=1e-5)
    assert out.logs["bootstrap"] == pytest.approx(loss_bs.item(), rel=1e-5)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7) for a, p in zip(grads, boot.generator.parameters(),
                                                                                 strict=True))
    # the student ran once with gradient on (s, T-1) and once without on t; the teacher got no gradient
    (with_grad, t_grad), (no_grad, t_nograd) = spy.calls
    assert t_grad and torch.equal(with_grad, torch.cat([GRID_S, torch.full((3,), T_LAST)]))
    assert not t_nograd and torch.equal(no_grad, GRID_T)


def test_no_gradient_passes_through_the_teacher_and_a_training_step_leaves_it_bit_identical(tmp_path):
    boot = boot_distiller()
    grads = teacher_input_grads(boot.teacher.unet, lambda: boot.generator_loss(boot.generator).loss.backward())
    assert grads and all(g is None for g in grads)  # the teacher gives targets: the bootstrap target is sg(...)
    train_steps_keep_teacher(boot, tmp_path)


def test_generator_loss_trains_only_the_student_and_boundary_starts_at_zero():
    boot = boot_distiller(boundary_batch_fraction=0.25)
    (update,) = boot.updates()
    assert update.module is boot.generator and update.ema_decay is not None
    out = boot.generator_loss(boot.generator)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logs["boundary"] < 1e-10  # a teacher copy is the teacher at T-1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in boot.generator.parameters())
    assert boot.num_boundary(64) == 16 and boot.num_boundary(2) == 1


def test_options_and_teachers_refused():
    with pytest.raises(ValueError, match="loss_weighting"):
        BOOTOptions(loss_weighting="sqrt").validate()
    with pytest.raises(ValueError, match="boundary_batch_fraction"):
        BOOTOptions(boundary_batch_fraction=0).validate()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        build_distiller("boot", Teacher(tiny_unet(), scheduler("epsilon", zero_snr=True)))
    with pytest.raises(ValueError, match="num_grid_steps"):
        build_distiller("boot", Teacher(tiny_unet(), scheduler()), BOOTOptions(num_grid_steps=1000))


# --- sampling and export ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_exported_pipeline_samples_g_at_zero_and_previews_the_trajectory(tmp_path):
    boot = boot_distiller()
    boot.export_pipeline(tmp_path / "boot")
    pipe = OneStepPipeline.from_pretrained(tmp_path / "boot")
    assert pipe.config.readout == "signal" and pipe.config.timesteps == [0]
    labels = torch.tensor([0, 1, 2])
    out = pipe(class_labels=labels, generator=seeded(3), output_type="pt", preview_timesteps=[999, 333])
    noise, condition = torch.randn((3, 1, 8, 8), generator=seeded(3)), Condition(class_labels=labels)
    direct = -boot.generator.unet(noise, torch.zeros(3, dtype=torch.long), class_labels=labels).sample  # v, alpha_T=0
    assert torch.allclose(out.images, to_unit(direct), atol=1e-6)
    assert torch.equal(boot.generator.sample(noise, condition, generator=seeded()), boot.generator(noise, condition))
    assert torch.allclose(boot.generator(noise, condition), direct, atol=1e-6)
    assert sorted(out.trajectory) == [333, 999]
    for t in (999, 333):
        assert torch.allclose(out.trajectory[t], to_unit(boot.generator(noise, condition, t)), atol=1e-6)
    images, trajectory = pipe(class_labels=labels, generator=seeded(3), output_type="pt", return_dict=False,
                              preview_timesteps=[5])
    assert torch.equal(images, out.images) and list(trajectory) == [5]


def test_pipeline_readout_arguments_are_checked():
    unet = tiny_unet(num_classes=3)
    with pytest.raises(ValueError, match="signal read-out"):
        OneStepPipeline(unet, scheduler())(class_labels=[0], preview_timesteps=[500])
    with pytest.raises(ValueError, match="one timestep"):
        OneStepPipeline(unet, scheduler(), timesteps=[999, 0], readout="signal")
    with pytest.raises(ValueError, match="readout"):
        OneStepPipeline(unet, scheduler(), readout="eps")
    with pytest.raises(ValueError, match="preview_timesteps"):
        OneStepPipeline(unet, scheduler(), timesteps=[0], readout="signal")(class_labels=[0], preview_timesteps=[1000])


def test_cli_smoke_run_exports_a_sampleable_pipeline(tmp_path):
    from onestep.cli import main
    from onestep.sampling.inference import load_sampler

    out = tmp_path / "run"
    assert main(["train", str(CONFIG), f"output_dir={out}", "train.max_steps=3", "train.max_minutes=null",
                 "train.eval_every=0", "eval.num_samples=20", "data.batch_size=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and "fd_digits/student" in metrics["final"]
    sampler = load_sampler(out / "pipeline")
    assert sampler.nfe == 1 and sampler._pipe.config.readout == "signal"
    images = sampler.sample(torch.arange(4), 4, seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_teacher_signal_trajectory_matches_diffusers_ddim():
    from onestep.distillers.boot import teacher_signal_trajectory

    boot = boot_distiller()
    noise, condition = batch()
    expected = teacher_ddim_trajectory(boot.teacher, noise, condition)
    got = teacher_signal_trajectory(boot.teacher, noise, condition, torch.tensor([0, 333, 666, 999]))
    assert sorted(got) == sorted(expected)
    for t in expected:
        assert torch.allclose(got[t], expected[t], atol=1e-4), t
