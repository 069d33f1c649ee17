"""MSD: a student only ever sees its own slice (regression excepted), smaller students, teacher score matching."""

import pytest
import torch

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.msd import MSDOptions
from onestep.distillers.regression import RegressionOptions
from onestep.distillers.tsm import TSMOptions
from onestep.eval.judge import Judge
from onestep.models.teacher import Teacher
from onestep.models.unet import num_parameters
from tests.conftest import scheduler, teacher_input_grads, tiny_unet


def _teacher(num_classes: int = 4) -> Teacher:
    return Teacher(tiny_unet(num_classes=num_classes), scheduler())


def _real(num_classes: int = 4, n: int = 40) -> RealImages:
    return RealImages(torch.rand(n, 1, 8, 8) * 2 - 1, torch.arange(n) % num_classes)


def _msd(student: int = 1, **options) -> object:
    options = MSDOptions(num_students=2, student=student, generator_timesteps=[400], **options)
    return build_distiller("msd", _teacher(), options, real=_real(), judge=Judge(20, num_classes=4), batch_size=6)


def _spy_labels(msd) -> list[torch.Tensor]:
    seen = []
    teacher_x0, fake_forward = msd.teacher.x0_with_grad, msd.fake.forward

    def teacher_spy(x_t, t, condition, guidance_scale=None):
        seen.append(condition.class_labels.clone())
        return teacher_x0(x_t, t, condition, guidance_scale)

    def fake_spy(x_t, t, condition, output="x0"):
        seen.append(condition.class_labels.clone())
        return fake_forward(x_t, t, condition, output)

    msd.teacher.x0_with_grad, msd.fake.forward = teacher_spy, fake_spy
    return seen


@pytest.mark.parametrize("student, own", [(0, {0, 1}), (1, {2, 3})])
def test_student_losses_only_see_their_own_slice(student, own):
    torch.manual_seed(0)
    msd = _msd(student, gan=True)
    seen = _spy_labels(msd)
    for _ in range(3):
        msd.generator_loss(msd.generator).loss.backward()
        msd.critic_loss(msd.fake).loss.backward()
    labels = set(torch.cat(seen).tolist())
    assert labels == own  # the generator's samples, the DM scores and the GAN's real images alike
    assert set(msd.real.labels.tolist()) == own
    assert set(msd.judge.classes) == own and msd.judge.reference == f"digits:{','.join(map(str, sorted(own)))}"


def test_regression_pairs_span_all_slices(tmp_path):
    msd = _msd(1, regression=RegressionOptions(weight=0.25, num_pairs=8, teacher_steps=2, batch_size=4))
    assert set(msd.regression.conditions.classes.tolist()) == {0, 1, 2, 3}  # by design, over every slice
    assert set(msd.conditions.classes.tolist()) == {2, 3}


def test_smaller_student_from_scratch_or_from_tsm(tmp_path):
    small = _msd(0, student_channels=[4, 8])
    teacher = small.teacher
    assert num_parameters(small.generator.unet) < 0.6 * num_parameters(teacher.unet)
    assert num_parameters(small.fake.unet) == num_parameters(teacher.unet)  # the critic stays a teacher copy

    tsm = build_distiller("tsm", teacher, TSMOptions(block_out_channels=[4, 8]), real=_real(), batch_size=4)
    with torch.no_grad():
        for p in tsm.unet.parameters():
            p.add_(0.01)
    tsm.export_pipeline(tmp_path / "tsm")
    from_tsm = build_distiller("msd", teacher, MSDOptions(num_students=2, student=0, generator_timesteps=[400],
                                                         student_init=str(tmp_path / "tsm"), gan=False), batch_size=2)
    for a, b in zip(tsm.unet.state_dict().values(), from_tsm.generator.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options, message", [
    (dict(student=None), "set options.student"),
    (dict(student=0, partition="mapping", mapping=[0, 0, 1]), "class"),
    (dict(student=0, partition="text_pca"), "text teacher"),
])
def test_bad_msd_settings_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        build_distiller("msd", _teacher(), MSDOptions(num_students=2, gan=False, **options), batch_size=2)


def test_tsm_loss_is_the_x0_gap_to_the_teacher_and_trains_only_the_small_unet():
    teacher = _teacher()
    tsm = build_distiller("tsm", teacher, TSMOptions(block_out_channels=[4, 8]), real=_real(), batch_size=5)
    torch.manual_seed(3)
    grads = teacher_input_grads(teacher.unet, lambda: tsm.loss(tsm.unet).loss.backward())
    assert grads == [None]  # the teacher's x0 is the target: no gradient through it
    assert all(p.grad is not None for p in tsm.unet.parameters() if p.requires_grad)

    torch.manual_seed(3)  # the same draws, the loss written out: x0 = a x_t - s v of the v-prediction UNets
    loss = tsm.loss(tsm.unet).loss
    torch.manual_seed(3)
    index = torch.randint(0, 40, (5,))
    x, labels = tsm.real.images[index], tsm.real.labels[index]
    t = torch.randint(0, 1000, (5,))
    eps = torch.randn_like(x)
    abar = teacher.scheduler.alphas_cumprod[t].reshape(5, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    with torch.no_grad():
        x0_student = abar.sqrt() * x_t - (1 - abar).sqrt() * tsm.unet(x_t, t, class_labels=labels).sample
        x0_teacher = abar.sqrt() * x_t - (1 - abar).sqrt() * teacher.unet(x_t, t, class_labels=labels).sample
    expected = ((x0_student - x0_teacher) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and expected > 0


def test_train_all_students_then_assemble_the_routed_pipeline(tmp_path):
    from pathlib import Path

    from onestep.cli import main
    from onestep.models.loading import load_model
    from onestep.pipelines import MultiStudentPipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "digits" / "msd.yaml"
    out = tmp_path / "msd"
    assert main(["train", str(config), f"output_dir={out}", "train.max_steps=1", "train.eval_every=0",
                 "eval.num_samples=20", "options.num_students=2", "data.batch_size=4"]) == 0
    pipe = MultiStudentPipeline.from_pretrained(out / "pipeline")
    assert pipe.config.router == {"type": "class_range", "num_classes": 10, "num_students": 2}
    for k in range(2):
        trained = load_model(out / f"student_{k}" / "pipeline" / "unet")
        assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                     getattr(pipe, f"unet_{k}").state_dict().values(), strict=True))
