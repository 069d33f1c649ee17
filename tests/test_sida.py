"""SiDA / SiD²A: both losses against a direct re-computation, where gradients may and may not flow, weight 0 is SiD,
real images reach the discriminator, SiD²A continues a SiD run's generator and fake score."""

import json

import pytest
import torch
import torch.nn.functional as F

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.sid import SiDOptions
from onestep.distillers.sida import SiDAOptions
from onestep.models.teacher import Teacher
from onestep.runs import critic_file
from onestep.training.trainer import Trainer, TrainerConfig
from tests.conftest import scheduler, teacher_input_grads, tiny_unet, train_steps_keep_teacher


def _real() -> RealImages:
    torch.manual_seed(5)
    return RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))


def _sida(teacher=None, **options):
    teacher = teacher or Teacher(tiny_unet(num_classes=3), scheduler())
    options = {"gan_generator_weight": 0.05, "gan_critic_weight": 2.0, **options}
    return build_distiller("sida", teacher, SiDAOptions(**options), real=_real(), batch_size=4)


def _record(module, name):
    """Wrap `module.name` to record every call's arguments and result."""
    calls, inner = [], getattr(module, name)

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("head", ["mean", "bottleneck"])
def test_generator_loss_equals_its_direct_recomputation(head):
    sida = _sida(gan_head=head)
    draws = _record(sida, "draw")
    teacher_calls = _record(sida.teacher, "x0_with_grad")
    out = sida.generator_loss(sida.generator)
    (_, _, (x_g, _, condition)), = draws
    ((x_t, t, _), _, mu_real), = teacher_calls
    with torch.no_grad():
        mu_fake, logits = sida.fake(x_t, t, condition, output="x0+logits")
        x_g, mu_real = x_g.detach(), mu_real.detach()
        omega = 1 / (x_g - mu_real).abs().mean((1, 2, 3))
        diff = mu_real - mu_fake
        sid = (omega[:, None, None, None] * diff * ((mu_real - x_g) - 1.0 * diff)).sum((1, 2, 3))  # alpha 1
        gan = 64 * omega * F.softplus(-logits.clamp(-10, 10)).mean()  # CHW = 1 * 8 * 8
        expected = (sid + 0.05 * gan).mean()
    assert logits.shape == ((4, 4, 4) if head == "mean" else (4,))  # mean: one logit per bottleneck position
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_critic_loss_equals_its_direct_recomputation_and_real_images_reach_the_discriminator(prediction_type):
    sida = _sida(Teacher(tiny_unet(num_classes=3), scheduler(prediction_type, zero_snr=False)),
                 critic_timesteps="all")
    draws = _record(sida, "draw")
    reals = _record(sida.real, "sample")
    fake_calls = _record(sida.fake, "forward")
    out = sida.critic_loss(sida.fake)
    (_, _, (x_g, _, condition)), = draws
    (_, _, (real, real_condition)), = reals
    outputs = [kw.get("output") or args[3] for args, kw, _ in fake_calls]
    assert outputs == ["raw", "raw+logits", "logits"]  # (raw is the inner call of raw+logits' one pass)
    _, (fake_args, _, (raw, fake_logits)), (real_args, _, real_logits) = fake_calls
    x_t, t = fake_args[:2]
    real_t, t_real, seen_condition = real_args[:3]
    abar = sida.teacher.scheduler.alphas_cumprod.double()[t].float()[:, None, None, None]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    noise = (x_t - a * x_g) / s
    assert torch.equal(t_real, t)  # the real images at the critic's t ...
    assert torch.allclose(real_t, a * real + s * noise, atol=1e-5)  # ... with the same noise, as the official code
    assert torch.equal(seen_condition.class_labels, real_condition.class_labels)
    assert real.abs().sum() > 0 and not torch.allclose(real_t, x_t)
    with torch.no_grad():
        # the official loss per sample (sida_loss.py): lambda(sigma) [sum_CHW (x0_psi - x)^2 + w_D * BCE / 2]
        x0_psi = {"epsilon": (x_t - s * raw) / a, "v_prediction": a * x_t - s * raw, "sample": raw}[prediction_type]
        x0_sq = (x0_psi - x_g).square().sum((1, 2, 3))
        disc = 0.5 * (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()
        ve_sigma = (s / a).flatten()
        lam = 1 / 0.5**2 + 1 / ve_sigma.square()
        official = lam * (x0_sq + 2.0 * disc)
        # ours per sample: the official one divided by lambda * CHW * k(t), k = |x0 error|^2 per unit of the
        # teacher-parameterisation error (whose mean over CHW is our DSM): at every t the same D : DSM ratio
        k = {"epsilon": ve_sigma.square(), "v_prediction": s.flatten().square(), "sample": torch.ones_like(lam)}
        expected = (official / (lam * 64 * k[prediction_type])).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-4)


@pytest.mark.parametrize("head", ["mean", "bottleneck"])
def test_gradients_flow_only_where_they_should(head, tmp_path):
    sida = _sida(gan_head=head)
    sida.generator_loss(sida.generator).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sida.generator.parameters())
    assert all(p.grad is None for p in sida.fake.parameters())  # the adversarial term leaves the critic alone
    sida.generator.zero_grad(set_to_none=True)
    sida.critic_loss(sida.fake).loss.backward()
    assert all(p.grad is None for p in sida.generator.parameters())  # the discriminator loss leaves G alone
    assert any(p.grad is not None for p in sida.fake.unet.parameters())
    if head == "bottleneck":
        assert all(p.grad is not None for p in sida.fake.head.parameters())
    grads = teacher_input_grads(sida.teacher.unet, lambda: sida.generator_loss(sida.generator).loss.backward())
    assert len(grads) == 1 and grads[0] is not None  # SiD's term differentiates the teacher's output
    train_steps_keep_teacher(sida, tmp_path)  # the teacher is never updated


def test_adversarial_term_changes_the_generator_gradient():
    grads = []
    for weight in (0.0, 0.05):
        sida = _sida(gan_generator_weight=weight)
        torch.manual_seed(0)
        sida.generator_loss(sida.generator).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in sida.generator.parameters() if p.grad is not None]))
    assert not torch.allclose(*grads)


def test_adversarial_weight_zero_is_sid_exactly(tmp_path):
    """Weights 0 (and SiD's alpha and clipping) train SiD exactly over a run from one seed: the same losses at every
    step and the same weights after it (no extra random draws, e.g. of real images, that would shift later steps)."""
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    sid_options = SiDOptions()
    runs = []
    for method, options in (("sid", sid_options),
                            ("sida", SiDAOptions(gan_generator_weight=0, gan_critic_weight=0, alpha=sid_options.alpha,
                                                 generator_optimizer=sid_options.generator_optimizer))):
        distiller = build_distiller(method, teacher, options, real=_real(), batch_size=4)
        out = tmp_path / method
        Trainer(distiller, out, TrainerConfig(max_steps=4, log_every=1, checkpoint_every=0)).train()
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [(r["generator/loss"], r["critic/loss"]) for r in log if "critic/loss" in r]
        runs.append((losses, distiller.generator.state_dict(), distiller.fake.unet.state_dict()))
    (sid_losses, *sid_weights), (sida_losses, *sida_weights) = runs
    assert len(sid_losses) == 4 and sid_losses == sida_losses
    for a, b in zip(sid_weights, sida_weights, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.mark.parametrize("continue_critic", [False, True])
def test_sid2a_starts_from_a_sid_runs_generator_and_from_the_teacher_or_its_fake_score(tmp_path, continue_critic):
    """Official SiD²A (sida_training_loop.py, --sid_model) loads only G and G_ema from the SiD run and starts the fake
    score from the teacher; `init_critic` continues the SiD run's fake score instead (sid2a_continue.yaml)."""
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    stage1 = build_distiller("sid", teacher, SiDOptions(), batch_size=2)
    Trainer(stage1, tmp_path / "sid", TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    (tmp_path / "sid" / "config.json").write_text(json.dumps({"method": "sid"}))
    stage1.export_pipeline(tmp_path / "sid" / "pipeline")
    teacher_state = teacher.unet.state_dict()
    for head in ("mean", "bottleneck"):
        sida = build_distiller("sida", teacher, SiDAOptions(gan_head=head), real=_real(), batch_size=2,
                               init_generator=tmp_path / "sid" / "pipeline",
                               init_critic=critic_file(tmp_path / "sid") if continue_critic else None)
        fake_source = stage1.fake.unet.state_dict() if continue_critic else teacher_state
        for loaded, source in ((sida.generator.unet.state_dict(), stage1.generator.unet.state_dict()),
                               (sida.fake.unet.state_dict(), fake_source)):
            assert loaded.keys() == source.keys()
            assert all(torch.equal(v, source[k].float()) for k, v in loaded.items())
        assert any(not torch.equal(v, teacher_state[k].float())
                   for k, v in stage1.fake.unet.state_dict().items())  # stage 1 moved its fake score off the teacher
        sida.critic_loss(sida.fake).loss.backward()  # and it trains on from there


def test_official_defaults_alpha_one_and_no_generator_clipping():
    """Every official SiDA / SiD²A script runs --alpha 1; the official loop clips only the fake score's gradients.
    The shipped recipes keep both (a config's optimizer block merges into these defaults)."""
    from onestep.config import load_config

    options = SiDAOptions()
    assert options.alpha == 1.0 and SiDOptions().alpha == 1.2
    assert options.generator_optimizer.grad_clip is None and options.critic_optimizer.grad_clip == 10.0
    for name in ("sida", "sid2a", "sid2a_continue"):
        cfg = load_config(f"configs/digits/{name}.yaml")
        assert cfg.options.alpha == 1.0 and cfg.options.generator_optimizer.grad_clip is None, name


def test_options_are_checked():
    with pytest.raises(ValueError, match="real images"):
        build_distiller("sida", Teacher(tiny_unet(num_classes=3), scheduler()), SiDAOptions())
    for bad, match in (({"gan_head": "conv"}, "gan_head"), ({"gan_generator_weight": -1}, ">= 0"),
                       ({"fake_guidance": 2.0}, "unguided")):
        with pytest.raises(ValueError, match=match):
            SiDAOptions(**bad).validate()
