"""Two-stage runs: the second stage continues the first's generator and, with init_critic, its fake score."""

import json

import pytest
import torch

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.errors import UserInputError
from onestep.models.teacher import Teacher
from onestep.runs import critic_file
from onestep.training.trainer import Trainer, TrainerConfig
from tests.conftest import scheduler, tiny_unet


def _real() -> RealImages:
    return RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))


def test_init_critic_continues_the_fake_score_of_a_run_and_starts_a_new_gan_head(tmp_path):
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    stage1 = build_distiller("dmd2", teacher, DMDOptions(gan=False, generator_every=1), batch_size=2)
    Trainer(stage1, tmp_path / "stage1", TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    (tmp_path / "stage1" / "config.json").write_text(json.dumps({"method": "dmd2"}))
    stage1.export_pipeline(tmp_path / "stage1" / "pipeline")

    torch.manual_seed(1)
    stage2 = build_distiller("dmd2", teacher, DMDOptions(gan=True), real=_real(), batch_size=2,
                             init_generator=tmp_path / "stage1" / "pipeline",
                             init_critic=critic_file(tmp_path / "stage1"))
    torch.manual_seed(1)
    fresh = build_distiller("dmd2", teacher, DMDOptions(gan=True), real=_real(), batch_size=2)
    trained = stage1.fake.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in stage2.fake.unet.state_dict().items())
    assert any(not torch.equal(v, teacher.unet.state_dict()[k].float())
               for k, v in stage2.fake.unet.state_dict().items())  # stage 1 moved it away from the teacher
    for a, b in zip(stage2.fake.head.state_dict().values(), fresh.fake.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # stage 1 had no GAN head: it starts as in a fresh run

    with pytest.raises(UserInputError, match="not a onestep run folder"):
        critic_file(tmp_path / "stage1" / "pipeline")
    (tmp_path / "stage1" / "config.json").write_text(json.dumps({"method": "boot"}))
    with pytest.raises(UserInputError, match="no fake score"):
        critic_file(tmp_path / "stage1")
    (tmp_path / "stage1" / "config.json").write_text(json.dumps({"method": "dmd2"}))
    with pytest.raises(UserInputError, match="does not match"):
        build_distiller("dmd2", Teacher(tiny_unet(num_classes=5), scheduler()), DMDOptions(gan=False),
                        init_critic=critic_file(tmp_path / "stage1"))
    with pytest.raises(ValueError, match="no fake score to continue"):
        build_distiller("boot", teacher, init_critic=critic_file(tmp_path / "stage1"))


def test_an_all_students_msd_run_continues_each_students_critic(tmp_path):
    from onestep.config import config_from
    from onestep.runs import student_config

    (tmp_path / "s1" / "student_2").mkdir(parents=True)
    s1 = str(tmp_path / "s1")
    cfg = config_from({"method": "msd", "output_dir": "out", "init_generator": s1, "init_critic": s1})
    sub = student_config(cfg, 2)
    assert sub.init_generator == f"{s1}/student_2/pipeline" and sub.init_critic == f"{s1}/student_2"


def test_a_warm_start_starts_every_student_from_the_one_run(tmp_path):
    from onestep.config import config_from
    from onestep.runs import student_config

    warm = tmp_path / "warmup" / "student_0"  # a one-student run on the whole condition set
    (warm / "pipeline").mkdir(parents=True)
    cfg = config_from({"method": "msd", "output_dir": "out", "init_generator": str(warm / "pipeline"),
                       "init_critic": str(warm)})
    for k in range(4):
        sub = student_config(cfg, k)
        assert (sub.init_generator, sub.init_critic, sub.output_dir) == (str(warm / "pipeline"), str(warm),
                                                                         f"out/student_{k}")


def test_init_generator_refuses_a_generator_trained_on_the_other_input_scaling(tmp_path):
    """A DMD2 SDXL student (fed z itself) given to a run whose generator is fed sigma_t0 z would see the wrong
    input: refused, and accepted where the conventions agree."""
    teacher = Teacher(tiny_unet(num_classes=3), scheduler("epsilon", zero_snr=False))
    real = RealImages(torch.rand(8, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (8,)))
    unit = DMDOptions(generator_timesteps=[399], generator_input="unit")
    build_distiller("dmd2", teacher, unit, real=real).export_pipeline(tmp_path / "unit")
    assert json.loads((tmp_path / "unit" / "model_index.json").read_text())["input_scaling"] == "unit"
    with pytest.raises(UserInputError, match="input_scaling unit"):
        build_distiller("dmd2", teacher, DMDOptions(generator_timesteps=[399]), real=real,
                        init_generator=tmp_path / "unit")
    assert build_distiller("dmd2", teacher, unit, real=real,
                           init_generator=tmp_path / "unit").generator.input_scaling == "unit"
