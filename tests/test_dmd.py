"""DMD / DMD2: the loss against its formula, where gradients may and may not flow, timestep ranges, guidance."""

import pytest
import torch

from onestep.data.conditions import ConditionSampler, RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMD1Options, DMDOptions, distribution_matching_loss
from onestep.models.conditioning import Condition
from onestep.models.teacher import Teacher
from onestep.models.unet import unet_x0
from tests.conftest import critic_timesteps, scheduler, teacher_input_grads, tiny_unet, train_steps_keep_teacher


def test_dm_gradient_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    mu_real, mu_fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    distribution_matching_loss(x, mu_real, mu_fake).mean().backward()
    # direct re-computation: grad_x = (mu_fake - mu_real) / mean_CHW|x - mu_real| / (C*H*W) / B
    normaliser = (x.detach() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (mu_fake - mu_real) / normaliser / (2 * 4 * 4) / 3
    assert torch.allclose(x.grad, expected, atol=1e-7)
    # sign: a gradient step moves x from the fake score's mean towards the teacher's
    assert ((x.grad * (mu_real - mu_fake)).sum() < 0)


def test_dm_loss_nan_to_num_and_no_gradient_into_scores():
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    mu_real = torch.zeros(1, 1, 2, 2)  # x == mu_real == mu_fake: 0/0, cleaned to 0 by nan_to_num
    mu_fake = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = distribution_matching_loss(x, mu_real, mu_fake)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert mu_fake.grad is None


def _dmd(options=None, guidance=1.0, batch=8):
    teacher = Teacher(tiny_unet(num_classes=3), scheduler(), guidance_scale=guidance)
    real = RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))
    return build_distiller("dmd2", teacher, options or DMDOptions(), real=real, batch_size=batch)


def test_generator_loss_updates_only_the_generator():
    dmd = _dmd()
    out = dmd.generator_loss(dmd.generator)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dmd.generator.parameters())
    assert all(p.grad is None for p in dmd.fake.parameters())  # fake score and GAN head untouched
    assert {"dm", "gan"} <= set(out.logs)


def test_no_gradient_passes_through_the_teacher_and_a_training_step_leaves_it_bit_identical(tmp_path):
    dmd = _dmd()
    grads = teacher_input_grads(dmd.teacher.unet, lambda: dmd.generator_loss(dmd.generator).loss.backward())
    assert grads and all(g is None for g in grads)  # DMD's gradient is (mu_fake - mu_real) / norm: no teacher Jacobian
    train_steps_keep_teacher(dmd, tmp_path)


def test_critic_loss_updates_only_the_critic():
    dmd = _dmd()
    out = dmd.critic_loss(dmd.fake)
    out.loss.backward()
    assert all(p.grad is None for p in dmd.generator.parameters())
    assert any(p.grad is not None for p in dmd.fake.head.parameters())  # the discriminator trains with the critic
    assert any(p.grad is not None for p in dmd.fake.unet.parameters())


def test_critic_reuses_the_generator_sample_of_the_same_step():
    dmd = _dmd()
    calls = []
    forward = dmd.generator.forward
    dmd.generator.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    dmd.generator_loss(dmd.generator)
    dmd.critic_loss(dmd.fake)
    assert len(calls) == 1  # one generator pass per iteration, as in DMD2
    dmd.critic_loss(dmd.fake)
    assert len(calls) == 2  # a critic-only step draws a fresh sample


def test_dm_timesteps_range_guidance_on_teacher_only():
    dmd = _dmd(DMDOptions(gan=False), guidance=3.0, batch=256)
    seen_teacher, seen_fake = [], []
    teacher_x0, fake_forward = dmd.teacher.x0, dmd.fake.forward

    def record_teacher(x_t, t, condition, guidance_scale=None):
        out = teacher_x0(x_t, t, condition, guidance_scale)
        seen_teacher.append((x_t.clone(), t.clone(), condition.class_labels.clone(), out))
        return out

    def record_fake(x_t, t, condition, output="x0"):
        seen_fake.append(condition.class_labels.clone())
        return fake_forward(x_t, t, condition, output)

    dmd.teacher.x0, dmd.fake.forward = record_teacher, record_fake
    dmd.generator_loss(dmd.generator)
    x_t, t, labels, mu_real = seen_teacher[0]
    assert dmd.dm_range == (20, 981)  # DMD2: t ~ U[20, 980], both ends included
    assert t.min() >= 20 and t.max() <= 980 and t.max() > 900 and t.min() < 100
    # mu_real is the guided x0: x0_u + 3 (x0_c - x0_u), the unconditional pass at the null class (label 3)
    with torch.no_grad():
        x0_c = unet_x0(dmd.teacher.unet, dmd.teacher.schedule, x_t, t, Condition(class_labels=labels))
        null = Condition(class_labels=torch.full_like(labels, 3))
        x0_u = unet_x0(dmd.teacher.unet, dmd.teacher.schedule, x_t, t, null)
    assert torch.allclose(mu_real, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5)
    assert not torch.allclose(mu_real, x0_c, atol=1e-3)  # guidance changed the prediction
    assert all((labels < 3).all() for labels in seen_fake)  # the fake score never sees the null class


def test_critic_denoising_timesteps_cover_all_training_timesteps():
    dmd = _dmd(DMDOptions(gan=False), batch=600)
    t = critic_timesteps(dmd)
    # DMD2's fake score: t ~ U[0, T), wider than the DM range [20, 980] (P(miss) < 1e-5 at 600 draws)
    assert t.min() >= 0 and t.max() <= 999 and t.min() < 20 and t.max() > 980


def _spy_gan(dmd):
    """Record (input, t, logits) of every discriminator call of the fake score, and the real images drawn."""
    seen, reals = [], []
    forward, sample = dmd.fake.forward, dmd.real.sample

    def spy(x_t, t, condition, output="x0"):
        out = forward(x_t, t, condition, output)
        if "logits" in output:
            seen.append((x_t.detach().clone(), t.clone(), out.detach()))
        return out

    def spy_real(n, device):
        reals.append(sample(n, device))
        return reals[-1]

    dmd.fake.forward, dmd.real.sample = spy, spy_real
    return seen, reals


@pytest.mark.parametrize("gan_t_max, high", [(1.0, 1000), (0.05, 50), (0.0, 1)])
def test_gan_noise_timesteps_follow_gan_t_max(gan_t_max, high):
    """DMD2's diffusion_gan_max_timestep: the discriminator's real and fake inputs, and the generator's GAN term,
    are x_t = alpha_t x + sigma_t eps at t ~ U[0, gan_t_max T), eps ~ N(0, I); 0 means the clean sample itself at
    t = 0 (DMD2 without --diffusion_gan)."""
    dmd = _dmd(DMDOptions(gan_t_max=gan_t_max), batch=400)
    seen, reals = _spy_gan(dmd)
    dmd.generator_loss(dmd.generator)
    x = dmd._fresh[0]  # the generator step's sample, which the critic step reuses
    dmd.critic_loss(dmd.fake)
    assert len(seen) == 3  # generator's fake, critic's fake, critic's real
    schedule = dmd.teacher.schedule
    for (x_t, t, _), clean in zip(seen, (x, x, reals[0][0]), strict=True):
        assert t.min() >= 0 and t.max() < high
        assert t.max() >= 0.9 * (high - 1)  # the whole range is drawn, not a corner of it
        if gan_t_max == 0:
            assert torch.equal(x_t, clean)  # not noised at all (sigma_0 > 0 would add noise)
            continue
        eps = (x_t - schedule.alpha(t) * clean) / schedule.sigma(t)
        assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02  # unit noise (25,600 values per call)


def test_dmd2_gan_losses_equal_their_direct_recomputation():
    """DMD2's GAN terms (sd_guidance.py): generator w_G softplus(-D(fake)).mean(); discriminator
    w_D [softplus(D(fake)).mean() + softplus(-D(real)).mean()], added to the DM and denoising losses."""
    dmd = _dmd(DMDOptions(gan_generator_weight=0.3, gan_critic_weight=0.7), batch=6)
    seen, _ = _spy_gan(dmd)
    out_g = dmd.generator_loss(dmd.generator)
    out_c = dmd.critic_loss(dmd.fake)
    (_, _, gen_logits), (_, _, fake_logits), (_, _, real_logits) = seen
    softplus = torch.nn.functional.softplus
    expected_g = out_g.logs["dm"] + 0.3 * softplus(-gen_logits).mean()
    expected_c = out_c.logs["denoising"] + 0.7 * (softplus(fake_logits).mean() + softplus(-real_logits).mean())
    assert abs(out_g.loss.item() - expected_g.item()) < 1e-5 * max(1.0, abs(expected_g.item()))
    assert abs(out_c.loss.item() - expected_c.item()) < 1e-5 * max(1.0, abs(expected_c.item()))
    assert out_g.logs["gan"] == pytest.approx(softplus(-gen_logits).mean().item(), rel=1e-5)


def test_generator_reads_x0_at_t_init_from_pure_noise():
    dmd = _dmd()
    z = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    x = dmd.generator(z, Condition(class_labels=labels))
    # zero-terminal-SNR v-prediction: alpha_999 = 0, sigma_999 = 1, x0 = -v(z)
    v = dmd.generator.unet(z, torch.tensor([999, 999]), class_labels=labels).sample
    assert torch.allclose(x, -v, atol=1e-6)


def test_multistep_generator_backward_simulation_uses_fresh_noise():
    dmd = _dmd(DMDOptions(generator_timesteps=[999, 499], gan=False))
    z, c = torch.randn(2, 1, 8, 8), Condition(class_labels=torch.tensor([0, 1]))
    torch.manual_seed(1)
    x1 = dmd.generator.simulate(z, c, 1)
    torch.manual_seed(1)
    fresh = torch.randn(2, 1, 8, 8)
    x0 = dmd.generator(z, c, 0)
    expected = dmd.teacher.schedule.add_noise(x0, fresh, torch.tensor(499))
    assert torch.allclose(x1, expected, atol=1e-6)


def test_dmd_and_dmd2_are_presets_of_one_distiller():
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    dmd = build_distiller("dmd", teacher, DMD1Options(regression=DMD1Options().regression.__class__(
        weight=0.25, num_pairs=8, teacher_steps=2, batch_size=4)))
    assert type(dmd).__name__ == "DMD" and dmd.fake.head is None and dmd.regression is not None
    updates = {u.name: u.every for u in dmd.updates()}
    assert updates == {"generator": 1, "critic": 1}
    out = dmd.generator_loss(dmd.generator)
    assert "regression" in out.logs and "gan" not in out.logs
    dmd2 = _dmd()
    assert {u.name: u.every for u in dmd2.updates()} == {"generator": 5, "critic": 1}


def test_regression_pairs_come_from_teacher_ddim_and_are_cached(tmp_path):
    from onestep.distillers.regression import PairedRegression, RegressionOptions

    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    dmd = _dmd()
    options = RegressionOptions(weight=1.0, num_pairs=6, teacher_steps=3, batch_size=4)
    reg = PairedRegression(teacher, dmd.conditions, options, tmp_path)
    # 3 DDIM steps (eta 0) written out: trailing timesteps 999, 666, 332; the step from t lands on t - T // 3 (the
    # last one on alpha = 1); x0 = alpha x_t - sigma v of the v-prediction UNet, eps = (x_t - alpha x0) / sigma
    abar = teacher.scheduler.alphas_cumprod.double()
    x = reg.noise.double()
    with torch.no_grad():
        for t, prev in ((999, 666), (666, 333), (332, -1)):
            v = teacher.unet(x.float(), torch.full((6,), t), class_labels=reg.index).sample.double()
            x0 = abar[t].sqrt() * x - (1 - abar[t]).sqrt() * v
            eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert torch.allclose(reg.targets.double(), x, atol=1e-4)
    cached = list(tmp_path.glob("regression-pairs-*.safetensors"))
    assert len(cached) == 1
    again = PairedRegression(teacher, dmd.conditions, options, tmp_path)
    assert torch.equal(again.targets, reg.targets)


def test_regression_pairs_of_an_earlier_run_are_read_only_when_drawn_for_the_same_teacher(tmp_path, monkeypatch):
    import dataclasses

    import onestep.distillers.regression as regression
    from onestep.distillers.regression import PairedRegression, RegressionOptions

    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    dmd = _dmd()
    options = RegressionOptions(weight=1.0, num_pairs=4, teacher_steps=2)
    drawn = PairedRegression(teacher, dmd.conditions, options, tmp_path / "first" / "cache")
    (pairs,) = (tmp_path / "first" / "cache").glob("regression-pairs-*.safetensors")
    monkeypatch.setattr(regression, "sample_teacher", lambda *a, **k: pytest.fail("pairs drawn again"))
    given = dataclasses.replace(options, pairs=str(pairs))
    read = PairedRegression(teacher, dmd.conditions, given, tmp_path / "second" / "cache")
    assert torch.equal(read.targets, drawn.targets) and torch.equal(read.noise, drawn.noise)
    assert not (tmp_path / "second").exists()  # read, not copied
    others = [(Teacher(teacher.unet, scheduler(), guidance_scale=2.0), dmd.conditions, given),  # guidance
              (teacher, ConditionSampler(classes=[2, 1, 0]), given),  # the same number of other conditions
              (teacher, dmd.conditions, dataclasses.replace(given, num_pairs=5))]
    for t, c, o in others:
        with pytest.raises(ValueError, match="drawn for another"):
            PairedRegression(t, c, o)
    with pytest.raises(ValueError, match="is not a file"):
        PairedRegression(teacher, dmd.conditions, dataclasses.replace(options, pairs=str(tmp_path / "missing")))


def test_regression_pairs_take_their_own_guidance_when_given(tmp_path):
    import dataclasses

    from onestep.distillers.regression import PairedRegression, RegressionOptions

    unet, dmd = tiny_unet(num_classes=3), _dmd()
    options = RegressionOptions(weight=1.0, num_pairs=4, teacher_steps=2)
    at_two = PairedRegression(Teacher(unet, scheduler(), guidance_scale=2.0), dmd.conditions, options, tmp_path)
    at_one = Teacher(unet, scheduler(), guidance_scale=1.0)
    given = PairedRegression(at_one, dmd.conditions, dataclasses.replace(options, guidance_scale=2.0))
    assert torch.allclose(given.targets, at_two.targets, atol=1e-6)  # the sampler ran at 2, the real score stays at 1
    assert not torch.allclose(PairedRegression(at_one, dmd.conditions, options).targets, at_two.targets, atol=1e-3)
    (pairs,) = tmp_path.glob("regression-pairs-*.safetensors")  # and a file drawn at 2 serves it
    read = PairedRegression(at_one, dmd.conditions, dataclasses.replace(options, guidance_scale=2.0, pairs=str(pairs)))
    assert torch.equal(read.targets, at_two.targets)
    unconditional = Teacher(tiny_unet(num_classes=None), scheduler())
    with pytest.raises(ValueError, match="needs a conditional teacher"):  # guidance would silently do nothing
        PairedRegression(unconditional, ConditionSampler(), dataclasses.replace(options, guidance_scale=2.0))


@pytest.mark.parametrize("distance", ["mse", "pseudo_huber"])
def test_regression_distances(distance, tmp_path):
    from onestep.distillers.regression import PairedRegression, RegressionOptions

    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    dmd = _dmd()
    options = RegressionOptions(weight=1.0, distance=distance, num_pairs=5, teacher_steps=2, batch_size=7)
    reg = PairedRegression(teacher, dmd.conditions, options, tmp_path)
    inputs = []
    forward = dmd.generator.forward
    dmd.generator.forward = lambda z, c, *a: inputs.append(z) or forward(z, c, *a)
    loss = reg.loss(dmd.generator)
    (z,) = inputs
    pick = [next(i for i in range(5) if torch.equal(reg.noise[i], row)) for row in z]  # the pairs it drew
    with torch.no_grad():
        x, y = forward(z, Condition(class_labels=reg.index[pick])), reg.targets[pick]
    if distance == "mse":
        expected = torch.stack([((a - b) ** 2).sum() / a.numel() for a, b in zip(x, y, strict=True)]).mean()
    else:  # iCT's pseudo-Huber: sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d)
        c = 0.00054 * 64**0.5
        expected = torch.stack([(((a - b) ** 2).sum() + c**2).sqrt() - c for a, b in zip(x, y, strict=True)]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0


def test_latent_text_teacher_runs_through_the_same_distiller(text_teacher):
    from onestep.data.conditions import ConditionSampler

    prompts = ["a cat", "dog", "cat dog"]
    conditions = ConditionSampler(prompts=prompts, encode=text_teacher.encode_prompts)
    real = RealImages(torch.rand(6, 3, 16, 16) * 2 - 1, encode=text_teacher.encode,
                      unlabeled=text_teacher.unconditional)
    text_teacher.guidance_scale = 4.0
    dmd = build_distiller("dmd2", text_teacher, DMDOptions(), conditions=conditions, real=real, batch_size=4)
    out = dmd.generator_loss(dmd.generator)
    out.loss.backward()
    assert torch.isfinite(out.loss) and {"dm", "gan"} <= set(out.logs)
    assert all(p.grad is None for p in dmd.fake.parameters())
    critic = dmd.critic_loss(dmd.fake)
    critic.loss.backward()
    assert any(p.grad is not None for p in dmd.fake.head.parameters())
    assert dmd.generator.unet.config.cross_attention_dim == 16


def test_text_to_image_generator_exports_a_prompted_pipeline(tmp_path, text_teacher):
    from onestep.data.conditions import ConditionSampler
    from onestep.pipelines import OneStepPipeline

    conditions = ConditionSampler(prompts=["a cat", "dog"], encode=text_teacher.encode_prompts)
    dmd = build_distiller("dmd2", text_teacher, DMDOptions(gan=False), conditions=conditions, batch_size=2)
    dmd.export_pipeline(tmp_path / "pipe")
    pipe = OneStepPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16)
    # the pipeline's output is the generator's one-step sample decoded by the VAE, from the same noise and prompts
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    condition = text_teacher.encode_prompts(["a cat", "dog"])
    expected = (text_teacher.decode(dmd.generator.sample(z, condition)).clamp(-1, 1) + 1) / 2
    assert torch.allclose(images, expected, atol=1e-4)


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    from onestep.training.trainer import Trainer, TrainerConfig

    def train(out, steps):
        torch.manual_seed(0)
        dmd = _dmd(DMDOptions(generator_every=3), batch=4)
        Trainer(dmd, out, TrainerConfig(max_steps=steps, checkpoint_every=0, seed=3)).train()
        return dmd

    straight = train(tmp_path / "a", 8)
    train(tmp_path / "b", 4)  # stops after 4 steps with a checkpoint, mid TTUR period
    resumed = train(tmp_path / "b", 8)
    for name in ("generator", "fake"):
        for (key, a), b in zip(getattr(straight, name).state_dict().items(),
                               getattr(resumed, name).state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}.{key} differs after resume"
