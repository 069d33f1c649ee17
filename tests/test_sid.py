"""SiD: the loss against both algebraic forms of its formula, gradient paths, the generator's init noise level."""

import torch

from onestep.conditioning import Condition
from onestep.distillers import build_distiller
from onestep.distillers.sid import SiDOptions, sid_loss
from onestep.teacher import Teacher
from tests.conftest import scheduler, tiny_unet


def test_sid_loss_matches_both_forms():
    torch.manual_seed(0)
    x, r, f = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    alpha = 1.2
    omega = 1 / (x - r).abs().mean(dim=(1, 2, 3), keepdim=True)
    form_a = (omega * (r - f) * ((r - x) - alpha * (r - f))).sum(dim=(1, 2, 3))
    # (r-f).(r-x) - a|r-f|^2 = (1-a)|r-f|^2 + (r-f).(f-x)
    form_b = (omega * ((1 - alpha) * (r - f) ** 2 + (r - f) * (f - x))).sum(dim=(1, 2, 3))
    assert torch.allclose(sid_loss(x, r, f, alpha), form_a, atol=1e-5)
    assert torch.allclose(form_a, form_b, atol=1e-5)


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
    assert all(p.grad is None for p in sid.teacher.parameters())
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
