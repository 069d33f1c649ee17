"""SiD: the gradient against its score-identity form on analytic Gaussian scores, gradient paths, timestep ranges,
the generator's init noise level."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.sid import SiDOptions, sid_loss
from onestep.distillers.sida import SiDAOptions
from onestep.models.conditioning import Condition
from onestep.models.schedules import VPSchedule
from onestep.models.teacher import Teacher
from tests.conftest import critic_timesteps, scheduler, teacher_input_grads, tiny_unet, train_steps_keep_teacher


class GaussianDenoiser(nn.Module):
    """E[x0 | x_t] for x0 ~ N(m, s^2 I), x_t = a x0 + b eps: m + a s^2 / (a^2 s^2 + b^2) (x_t - a m), called like a
    diffusers UNet that predicts `sample` (x0)."""

    def __init__(self, schedule, m: float, s: float):
        super().__init__()
        self.schedule = schedule
        self.m, self.s = nn.Parameter(torch.tensor(m)), nn.Parameter(torch.tensor(s))
        self.config = SimpleNamespace(sample_size=4, in_channels=1, num_class_embeds=None)

    def forward(self, x_t, t, return_dict=False):
        a, b = self.schedule.alpha(t, x_t.dim()), self.schedule.sigma(t, x_t.dim())
        return (self.m + a * self.s**2 / (a**2 * self.s**2 + b**2) * (x_t - a * self.m),)


class AffineGenerator(GaussianDenoiser):
    """A toy generator G(x) = m + s x: its samples are Gaussian."""

    def forward(self, x, t, return_dict=False):
        return (self.m + self.s * x,)


def test_sid_gradient_matches_its_score_identity_form_on_gaussian_scores():
    """SiD eq. (22) in score form: with S = grad log p_t, delta = S_real - S_fake and the score identity
    E[S_theta(x_t)] = E[-eps / b], L = omega (b^2 / a)^2 [delta . (S_real + eps / b) - alpha |delta|^2]. Here the data
    N(0.5, 0.8^2), the fake score's fit N(-0.3, 1.3^2) and the generator's output are Gaussian, so the scores are the
    closed-form Gaussian marginal scores -(x - a m) / (a^2 s^2 + b^2): no network, no x0 read-out involved."""
    sched = scheduler("sample")
    teacher_net = GaussianDenoiser(VPSchedule.from_scheduler(sched), 0.5, 0.8)
    sid = build_distiller("sid", Teacher(teacher_net, sched), SiDOptions(alpha=1.2), batch_size=16)
    schedule = sid.teacher.schedule
    sid.generator.unet, sid.fake.unet = AffineGenerator(schedule, 0.2, 1.1), GaussianDenoiser(schedule, -0.3, 1.3)
    seen = {}
    generator_forward, teacher_x0 = sid.generator.forward, sid.teacher.x0_with_grad
    sid.generator.forward = lambda z, *a: seen.setdefault("z", z) is None or generator_forward(z, *a)
    sid.teacher.x0_with_grad = lambda x_t, t, c: seen.update(x_t=x_t.detach(), t=t) or teacher_x0(x_t, t, c)
    loss = sid.generator_loss(sid.generator).loss
    loss.backward()

    m, s = (p.detach().clone().requires_grad_(True) for p in (sid.generator.unet.m, sid.generator.unet.s))
    t, z = seen["t"], seen["z"]
    a, b = schedule.alpha(t), schedule.sigma(t)
    x_g = m + s * schedule.sigma(sid.generator.timesteps[0]) * z
    eps = (seen["x_t"] - a * x_g.detach()) / b  # the noise the code drew
    x_t = a * x_g + b * eps

    def score(mean, std):
        return -(x_t - a * mean) / (a**2 * std**2 + b**2)

    s_real, s_fake = score(0.5, 0.8), score(-0.3, 1.3)
    delta = s_real - s_fake
    omega = 1 / (x_g - (x_t + b**2 * s_real) / a).detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (omega * (b**2 / a) ** 2 * (delta * (s_real + eps / b) - 1.2 * delta**2)).sum(dim=(1, 2, 3)).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert sid.generator.unet.m.grad.item() == pytest.approx(m.grad.item(), rel=1e-4)
    assert sid.generator.unet.s.grad.item() == pytest.approx(s.grad.item(), rel=1e-4)
    assert abs(m.grad.item()) > 1e-3


def test_sid_omega_is_stop_gradient():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    r, f = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    sid_loss(x, r, f, 1.2).sum().backward()
    omega = 1 / (x.detach() - r).abs().mean(dim=(1, 2, 3), keepdim=True)
    # d/dx of omega * (r-f).(r-x) with omega constant = -omega (r-f)
    assert torch.allclose(x.grad, -omega * (r - f), atol=1e-5)


def _sid(**options):
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    return build_distiller("sid", teacher, SiDOptions(**options), batch_size=4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for checkpointing in (False, True):
        sid = _sid(gradient_checkpointing=checkpointing)
        assert sid.teacher.unet.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        loss = sid.generator_loss(sid.generator).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in sid.generator.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b, strict=True))


def test_generator_gradient_flows_through_both_score_inputs_only_to_the_generator():
    sid = _sid()
    x_g = sid.generator(torch.randn(4, 1, 8, 8), Condition(class_labels=torch.tensor([0, 1, 2, 0])))
    x_g.retain_grad()
    mu_real, mu_fake = sid.score_pair(x_g, Condition(class_labels=torch.tensor([0, 1, 2, 0])),
                                      Condition(class_labels=torch.tensor([0, 1, 2, 0])))
    assert mu_real.requires_grad and mu_fake.requires_grad  # both depend on x_g through x_t
    (mu_real.sum() + mu_fake.sum()).backward()
    assert x_g.grad is not None and x_g.grad.abs().sum() > 0
    assert all(p.grad is None for p in sid.fake.parameters())
    assert all(p.requires_grad for p in sid.fake.parameters())  # unfrozen again afterwards


def test_generator_loss_updates_only_generator_and_critic_only_critic():
    sid = _sid()
    sid.generator_loss(sid.generator).loss.backward()
    assert any(p.grad is not None for p in sid.generator.parameters())
    assert all(p.grad is None for p in sid.fake.parameters())
    sid.generator.zero_grad(set_to_none=True)
    sid.critic_loss(sid.fake).loss.backward()
    assert all(p.grad is None for p in sid.generator.parameters())
    assert any(p.grad is not None for p in sid.fake.parameters())


def test_generator_input_is_ve_sigma_2_5_on_the_vp_schedule():
    sid = _sid()
    (t_init,) = sid.generator.timesteps
    schedule = sid.teacher.schedule
    assert abs(schedule.ve_sigma(t_init).item() - 2.5) < 0.1
    z = torch.randn(1, 1, 8, 8)
    # VE input sigma_init z scaled into VP space is alpha * sigma_init * z = sigma_t z
    expected = schedule.alpha(t_init) * schedule.ve_sigma(t_init) * z
    assert torch.allclose(sid.generator.input_noise(z), expected, atol=1e-5)
    lo, hi = sid.t_range
    assert schedule.ve_sigma(lo) < 0.2 and schedule.ve_sigma(hi - 1) > 10


def test_sid_uses_adam_beta1_zero_and_one_to_one_alternation():
    sid = _sid()
    updates = {u.name: u for u in sid.updates()}
    assert updates["generator"].every == updates["critic"].every == 1
    assert updates["generator"].optimizer.betas[0] == 0.0 and updates["generator"].ema_decay is not None


def test_gradient_reaches_x_through_the_teacher_and_a_training_step_leaves_it_bit_identical(tmp_path):
    sid = _sid()
    grads = teacher_input_grads(sid.teacher.unet, lambda: sid.generator_loss(sid.generator).loss.backward())
    assert len(grads) == 1 and grads[0] is not None and grads[0].abs().sum() > 0  # SiD differentiates mu_real
    train_steps_keep_teacher(sid, tmp_path)


@pytest.mark.parametrize("option", ["generator", "all"])
def test_critic_timesteps(option):
    sid = _sid(critic_timesteps=option)
    sid.batch_size = 600
    t = critic_timesteps(sid)
    assert sid.t_range[0] > 30 and sid.t_range[1] < 970  # VE sigma 0.14 .. 13: narrower than all of 0..T-1
    lo, hi = sid.t_range if option == "generator" else (0, 1000)  # the generator loss's range, or all
    assert t.min() >= lo and t.max() < hi and t.min() < lo + 30 and t.max() >= hi - 30  # P(miss) < 1e-4


def test_lsg_guides_the_fake_score_in_both_losses():
    sid = _sid(fake_guidance=2.0, fake_train_guidance=3.0)
    calls = []
    forward = sid.fake.forward

    def spy(x_t, t, condition, output="x0"):
        out = forward(x_t, t, condition, output)
        calls.append((x_t, t, condition.class_labels, output, out))
        return out

    sid.fake.forward = spy

    def by_hand(x_t, t, labels, output, scale):  # one batched pass: [null class 3 | labels], then x_u + s (x_c - x_u)
        n = labels.shape[0]
        assert torch.equal(labels[:n // 2], torch.full((n // 2,), 3)) and torch.equal(x_t[:n // 2], x_t[n // 2:])
        with torch.no_grad():
            raw = sid.fake.unet(x_t, t, class_labels=labels).sample
            if output == "x0":
                abar = sid.teacher.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
                raw = abar.sqrt() * x_t - (1 - abar).sqrt() * raw
        uncond, cond = raw.chunk(2)
        return uncond + scale * (cond - uncond)

    condition = Condition(class_labels=torch.tensor([0, 1, 2, 0]))
    mu_fake = sid.score_pair(sid.generator(torch.randn(4, 1, 8, 8), condition), condition, condition)[1]
    assert torch.allclose(mu_fake, by_hand(*calls[0][:4], 2.0), atol=1e-5)
    calls.clear()
    samples = []
    generator_forward = sid.generator.forward
    sid.generator.forward = lambda *a: samples.append(generator_forward(*a)) or samples[-1]
    loss = sid.critic_loss(sid.fake).loss
    (x_t, t, _, output, _), (x0,) = calls[0], samples
    x_t, t = x_t[4:], t[4:]
    abar = sid.teacher.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    target = a * (x_t - a * x0) / s - s * x0  # v = a eps - s x0
    expected = ((by_hand(*calls[0][:4], 3.0) - target) ** 2).mean()
    assert output == "raw" and loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_both_losses_noise_their_samples_with_unit_noise(method):
    """x_t = alpha_t x + sigma_t eps with eps ~ N(0, I) in the generator loss (teacher and fake score at the same x_t)
    and in the fake score's denoising loss: recovered eps has mean 0 and std 1 over 25,600 values (std of the
    estimate ~0.005), so noise scaled by 1.1 (or missing) would show."""
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    options = SiDOptions() if method == "sid" else SiDAOptions()
    real = RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))
    sid = build_distiller(method, teacher, options, real=real, batch_size=400)
    samples, teacher_inputs, fake_inputs = [], [], []
    draw, x0_with_grad, forward = sid.draw, sid.teacher.x0_with_grad, sid.fake.forward
    sid.draw = lambda *a, **k: samples.append(draw(*a, **k)) or samples[-1]
    sid.teacher.x0_with_grad = lambda x_t, t, c: teacher_inputs.append((x_t, t)) or x0_with_grad(x_t, t, c)
    sid.fake.forward = lambda x_t, t, *a, **k: fake_inputs.append((x_t, t)) or forward(x_t, t, *a, **k)
    schedule = sid.teacher.schedule
    with torch.no_grad():
        sid.generator_loss(sid.generator)
        (generator_input,) = teacher_inputs
        assert all(torch.equal(a, b) for a, b in zip(fake_inputs[0], generator_input, strict=True))  # same x_t
        critic_start = len(fake_inputs)
        sid.critic_loss(sid.fake)
    for (x, _, _), (x_t, t) in ((samples[0], generator_input), (samples[1], fake_inputs[critic_start])):
        eps = (x_t - schedule.alpha(t) * x.detach()) / schedule.sigma(t)
        assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.02


def test_regression_term_adds_weight_times_chw_times_the_paired_distance_and_reaches_only_the_generator(tmp_path):
    from onestep.distillers.regression import RegressionOptions

    regression = RegressionOptions(weight=0.5, num_pairs=6, teacher_steps=2, batch_size=3)
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    sid = build_distiller("sid", teacher, SiDOptions(regression=regression), batch_size=4, regression_cache=tmp_path)
    assert list(tmp_path.glob("regression-pairs-*.safetensors"))  # drawn once, cached like DMD's
    (generator_update, _) = sid.updates()
    torch.manual_seed(0)
    out = generator_update.loss(sid.generator)
    torch.manual_seed(0)
    sid_only = sid.generator_loss(sid.generator).loss
    distance = sid.regression.loss(sid.generator)  # the same pairs: the RNG is where the combined loss drew them
    chw = 1 * 8 * 8
    assert torch.allclose(out.loss, sid_only + 0.5 * chw * distance, rtol=1e-5)
    assert out.logs["regression"] == pytest.approx(distance.item(), rel=1e-5) and "score_gap" in out.logs
    out.loss.backward()
    assert any(p.grad is not None for p in sid.generator.parameters())
    assert all(p.grad is None for p in [*sid.fake.parameters(), *teacher.unet.parameters()])
    assert _sid().regression is None  # off by default: SiD's loss alone
    with pytest.raises(ValueError, match="forgotten concept"):
        from onestep.distillers.sfd import SFDOptions

        SFDOptions(forget=[1], override_class=0, regression=regression).validate()
