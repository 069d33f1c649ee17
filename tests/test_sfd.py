"""SFD: which network sees which concept, override choices, and bad forget classes."""

import pytest
import torch

from onestep.distillers import build_distiller
from onestep.distillers.sfd import SFDOptions
from onestep.models.teacher import Teacher
from tests.conftest import scheduler, teacher_input_grads, tiny_unet, train_steps_keep_teacher


def _sfd(**options):
    teacher = Teacher(tiny_unet(num_classes=4), scheduler())
    return build_distiller("sfd", teacher, SFDOptions(**options), batch_size=6)


def _record(sfd):
    """Labels each network is queried with, in call order."""
    seen = {"teacher": [], "fake": []}
    teacher_x0, fake_forward = sfd.teacher.x0_with_grad, sfd.fake.forward

    def teacher_spy(x_t, t, condition, guidance_scale=None):
        seen["teacher"].append(condition.class_labels.clone())
        return teacher_x0(x_t, t, condition, guidance_scale)

    def fake_spy(x_t, t, condition, output="x0"):
        seen["fake"].append(condition.class_labels.clone())
        return fake_forward(x_t, t, condition, output)

    sfd.teacher.x0_with_grad, sfd.fake.forward = teacher_spy, fake_spy
    return seen


def test_forget_term_queries_teacher_with_override_and_fake_with_forget():
    sfd = _sfd(forget=[0], override="fixed", override_class=2)
    seen = _record(sfd)
    grads = teacher_input_grads(sfd.teacher.unet, lambda: sfd.generator_loss(sfd.generator).loss.backward())
    (teacher_remain, teacher_forget), (fake_remain, fake_forget) = seen["teacher"], seen["fake"]
    assert (teacher_remain != 0).all() and torch.equal(teacher_remain, fake_remain)  # remain: same concept
    assert (teacher_forget == 2).all()  # the teacher is asked for the override concept ...
    assert (fake_forget == 0).all()  # ... while the fake score tracks the generator at the forgotten one
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)  # SiD: through the teacher
    assert all(p.grad is None for p in sfd.fake.parameters())


def test_a_training_step_leaves_the_teacher_bit_identical(tmp_path):
    train_steps_keep_teacher(_sfd(forget=[0], override="random"), tmp_path)


def test_random_override_never_picks_a_forgotten_class():
    sfd = _sfd(forget=[0, 3], override="random")
    seen = _record(sfd)
    for _ in range(5):
        sfd.generator_loss(sfd.generator)
    overrides = torch.cat(seen["teacher"][1::2])
    assert set(overrides.tolist()) <= {1, 2} and len(set(overrides.tolist())) == 2


def test_classifier_override_uses_pseudo_labels_without_the_forgotten_class():
    teacher = Teacher(tiny_unet(num_classes=4), scheduler())
    classifier = lambda x: torch.tensor([[9.0, 1.0, 2.0, 0.0]]).expand(x.shape[0], -1)  # noqa: E731
    sfd = build_distiller("sfd", teacher, SFDOptions(forget=[0], override="classifier"), batch_size=3,
                          classifier=classifier)
    seen = _record(sfd)
    sfd.generator_loss(sfd.generator)
    assert (seen["teacher"][1] == 2).all()  # argmax once class 0 is masked out


def test_critic_sees_generator_samples_of_both_concepts():
    sfd = _sfd(forget=[1], override="random")
    seen = _record(sfd)
    sfd.critic_loss(sfd.fake).loss.backward()
    assert all(p.grad is None for p in sfd.generator.parameters())
    labels = torch.cat(seen["fake"]) if seen["fake"] else None
    assert labels is not None and {1} < set(labels.tolist())


@pytest.mark.parametrize("options, message", [
    (dict(forget=[7]), "class 7 does not exist"),
    (dict(forget=[0], override="fixed", override_class=0), "itself forgotten"),
    (dict(forget=[0], override="classifier"), "needs a classifier"),
])
def test_bad_forget_settings_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        _sfd(**options)


def test_two_stage_starts_the_generator_from_stage_one_and_the_fake_score_from_the_teacher(tmp_path):
    from onestep.distillers.stages import init_generator
    from onestep.errors import UserInputError
    from onestep.export.pipeline import export_generator
    from onestep.models.generator import Generator

    teacher = Teacher(tiny_unet(num_classes=4), scheduler())
    stage1 = build_distiller("sid", teacher, batch_size=2)
    with torch.no_grad():
        for p in [*stage1.generator.parameters(), *stage1.fake.parameters()]:
            p.add_(0.1 * torch.randn_like(p))  # stand-in for stage-1 training
    export_generator(stage1.generator, teacher, tmp_path / "stage1")

    stage2 = build_distiller("sfd", teacher, SFDOptions(forget=[0]), batch_size=2)
    init_generator(stage2.generator, tmp_path / "stage1")
    for trained, loaded in zip(stage1.generator.state_dict().values(), stage2.generator.state_dict().values(),
                               strict=True):
        assert torch.equal(trained, loaded)
    for original, fake in zip(teacher.unet.state_dict().values(), stage2.fake.unet.state_dict().values(),
                              strict=True):
        assert torch.equal(original.float(), fake.float())  # the original teacher, not stage 1's critic

    with pytest.raises(UserInputError, match="timesteps"):  # a generator reading out at t = 999, not VE sigma 2.5
        init_generator(Generator.from_teacher(teacher.unet, teacher.schedule, [999]), tmp_path / "stage1")
    other_net = build_distiller("sid", Teacher(tiny_unet(num_classes=3), scheduler()),
                                batch_size=2)
    with pytest.raises(UserInputError, match="does not match"):
        init_generator(other_net.generator, tmp_path / "stage1")


def test_forget_batch_fraction_sizes_the_forget_batch():
    sfd = _sfd(forget=[0], override="fixed", override_class=2, forget_batch_fraction=0.5)
    seen = _record(sfd)
    sfd.generator_loss(sfd.generator).loss.backward()
    (teacher_remain, teacher_forget), _ = seen["teacher"], seen["fake"]
    assert len(teacher_remain) == 6 and len(teacher_forget) == 3


def test_critic_loss_weights_the_two_denoising_losses_as_configured():
    sfd = _sfd(forget=[1], override="random", critic_remain_weight=0.7, critic_forget_weight=0.2,
               forget_batch_fraction=0.5)
    samples, calls = [], []
    generator_forward, fake_forward = sfd.generator.forward, sfd.fake.forward
    sfd.generator.forward = lambda *a: samples.append(generator_forward(*a)) or samples[-1]

    def fake_spy(x_t, t, condition, output="x0"):
        calls.append((x_t, t, condition.class_labels))
        return fake_forward(x_t, t, condition, output)

    sfd.fake.forward = fake_spy
    loss = sfd.critic_loss(sfd.fake).loss
    abar = sfd.teacher.scheduler.alphas_cumprod
    terms = []
    for x0, (x_t, t, labels) in zip(samples, calls, strict=True):  # v-loss written out: v = a eps - s x0
        a, s = abar[t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
        eps = (x_t - a * x0) / s
        with torch.no_grad():
            v = sfd.fake.unet(x_t, t, class_labels=labels).sample
        terms.append(((v - (a * eps - s * x0)) ** 2).mean(dim=(1, 2, 3)).mean())
    (remain_labels, forget_labels) = calls[0][2], calls[1][2]
    assert len(remain_labels) == 6 and (remain_labels != 1).all() and len(forget_labels) == 3
    assert (forget_labels == 1).all()
    assert loss.item() == pytest.approx(0.7 * terms[0].item() + 0.2 * terms[1].item(), rel=1e-4)


@pytest.mark.parametrize("classifier_input", ["fake_x0", "sample"])
def test_classifier_override_labels_the_fake_scores_x0_at_x_t_or_the_sample(classifier_input):
    teacher = Teacher(tiny_unet(num_classes=4), scheduler())
    seen = []

    def classifier(images):
        seen.append(images.clone())
        return torch.tensor([[9.0, 1.0, 2.0, 0.0]]).expand(images.shape[0], -1)

    sfd = build_distiller("sfd", teacher, SFDOptions(forget=[0], override="classifier",
                                                     classifier_input=classifier_input), batch_size=3,
                          classifier=classifier)
    outputs = {"fake": [], "generator": []}
    fake_forward, generator_forward = sfd.fake.forward, sfd.generator.forward
    sfd.fake.forward = lambda *a, **k: outputs["fake"].append(fake_forward(*a, **k)) or outputs["fake"][-1]
    sfd.generator.forward = lambda *a: outputs["generator"].append(generator_forward(*a)) or outputs["generator"][-1]
    sfd.generator_loss(sfd.generator)
    (labelled,) = seen
    expected = outputs["fake"][1] if classifier_input == "fake_x0" else outputs["generator"][1]  # the forget batch's
    assert torch.equal(labelled, expected.detach())
