"""runs.py builds a run's task from the task registry (onestep.tasks): each kind names its methods, its data, its
options and its builder, so a new kind is a new module, not a branch in runs.py or config.py."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from onestep.config import load_config
from onestep.errors import UserInputError
from onestep.tasks import TaskKind, register_task, task_kind, task_options
from onestep.tasks.registry import TASK_KINDS


@pytest.mark.parametrize("method, data, kind", [
    ("teacher", "digits_t2i", "text_denoiser"),  # the data-specific kind wins
    ("teacher", "digits", "denoiser"),
    ("teacher", "image_folder", "denoiser"),
    ("vae", "digits_t2i", "vae"),
    ("dmd2", "digits", "distillation"),
    ("boot", "prompts", "distillation"),
])
def test_each_config_finds_its_kind(method, data, kind):
    assert task_kind(method, data).name == kind


def test_options_come_from_the_kind():
    from onestep.distillers import DISTILLERS
    from onestep.training.denoiser_task import DenoiserOptions
    from onestep.training.vae_task import VaeOptions

    assert task_options("teacher") is DenoiserOptions and task_options("vae") is VaeOptions
    assert all(task_options(m) is DISTILLERS[m].options_cls for m in DISTILLERS)


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(UserInputError, match="unknown method 'dmd3'.*dmd2.*teacher.*vae"):
        task_kind("dmd3", "digits")


@dataclass
class ToyOptions:
    width: int = 3


class ToyTask:
    """The least a Trainer needs: one update over a linear layer."""

    def __init__(self, width: int):
        from onestep.training.updates import OptimizerConfig, Update

        self.net = torch.nn.Linear(width, 1)
        self.update = Update("toy", self.net, self.loss, OptimizerConfig())

    def updates(self):
        return [self.update]

    def loss(self, net):
        from onestep.training.updates import LossOutput

        value = net(torch.ones(2, self.net.in_features)).square().mean()
        return LossOutput(value, {"loss": value.item()})


@pytest.fixture
def toy_kind():
    saved = list(TASK_KINDS)
    kind = register_task(TaskKind("toy", methods=lambda: ("toy",), options=lambda method: ToyOptions,
                                  build=lambda cfg: ToyTask(cfg.options.width)))
    yield kind
    TASK_KINDS[:] = saved


def test_a_kind_for_one_data_brings_its_own_options(toy_kind, tmp_path):
    from onestep.training.denoiser_task import DenoiserOptions

    # the text teacher's kind replaced by one with other options: configs on its data validate against them
    register_task(TaskKind("text_denoiser", methods=lambda: ("teacher",), options=lambda method: ToyOptions,
                           build=lambda cfg: ToyTask(cfg.options.width), data=("digits_t2i",)))
    assert task_options("teacher", "digits_t2i") is ToyOptions and task_options("teacher", "digits") is DenoiserOptions
    config = tmp_path / "teacher.yaml"
    config.write_text(f"method: teacher\noutput_dir: {tmp_path / 'out'}\ndata:\n  name: digits_t2i\n"
                      "options:\n  width: 4\n")
    assert load_config(config).options == ToyOptions(width=4)
    with pytest.raises(UserInputError, match="width"):  # on other data the teacher's own options apply
        load_config(config, ["data.name=digits"])


def test_a_registered_kind_is_configured_and_built_without_touching_runs(toy_kind, tmp_path):
    from onestep.runs import build_trainer

    config = tmp_path / "toy.yaml"
    config.write_text(f"method: toy\noutput_dir: {tmp_path / 'out'}\noptions:\n  width: 5\n")
    cfg = load_config(config)
    assert isinstance(cfg.options, ToyOptions) and cfg.options.width == 5
    trainer = build_trainer(cfg)
    assert isinstance(trainer.task, ToyTask) and trainer.task.net.in_features == 5
    assert (Path(cfg.output_dir) / "config.json").is_file()
    with pytest.raises(UserInputError, match="widht"):
        load_config(config, ["options.widht=2"])
