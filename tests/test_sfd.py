"""SFD: which network sees which concept, override choices, and bad forget classes."""

import pytest
import torch

from onestep.distillers import build_distiller
from onestep.distillers.sfd import SFDOptions
from onestep.teacher import Teacher
from tests.conftest import scheduler, tiny_unet


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
    sfd.generator_loss(sfd.generator).loss.backward()
    (teacher_remain, teacher_forget), (fake_remain, fake_forget) = seen["teacher"], seen["fake"]
    assert (teacher_remain != 0).all() and torch.equal(teacher_remain, fake_remain)  # remain: same concept
    assert (teacher_forget == 2).all()  # the teacher is asked for the override concept ...
    assert (fake_forget == 0).all()  # ... while the fake score tracks the generator at the forgotten one
    assert all(p.grad is None for p in sfd.teacher.parameters())
    assert all(p.grad is None for p in sfd.fake.parameters())


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
    from onestep.errors import UserInputError
    from onestep.export import export_generator
    from onestep.generator import Generator
    from onestep.runs import init_generator

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
