"""The frame every distiller shares: frozen teacher, trainable generator, condition sampling, evaluation, export."""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.data.conditions import ConditionSampler
from onestep.models.conditioning import Condition
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.training.updates import Update


def class_conditions(teacher: Teacher) -> ConditionSampler:
    """Uniform labels over the teacher's classes (no condition for an unconditional teacher)."""
    return ConditionSampler(classes=range(teacher.num_classes) if teacher.num_classes else None)


class Distiller:
    """Base class: subclasses build their critics and state their losses as `updates()`.

    A distiller knows no command line and does not run the loop: the Trainer calls its updates on their cadence.
    """

    options_cls: type
    export_readout = "x0"  # how the exported OneStepPipeline reads the generator out (see OneStepPipeline)

    def __init__(self, teacher: Teacher, options, conditions: ConditionSampler | None = None, judge=None,
                 generator_timesteps: list[int] | tuple[int, ...] = (999,), batch_size: int = 64,
                 generator_input: str = "sigma"):
        self.teacher, self.options, self.judge, self.batch_size = teacher, options, judge, batch_size
        self.conditions = conditions or class_conditions(teacher)
        self.generator = Generator.from_teacher(teacher.unet, teacher.schedule, generator_timesteps,
                                                share_frozen=self.shares_base(critic=False),
                                                input_scaling=generator_input)

    def shares_base(self, critic: bool) -> bool:
        """Whether the generator's (or, `critic`, a fake score's) UNet starts as a copy sharing the teacher's frozen
        weights: it will train LoRA adapters only (`options.lora`, `share_base`)."""
        lora = self.options.lora
        return lora.enabled and lora.share_base and (lora.critic or not critic)

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def updates(self) -> list[Update]:
        raise NotImplementedError

    def finalize(self) -> None:
        """The last step of building, once the networks hold their starting weights (`init_generator`,
        `init_critic`): what depends on the starting generator (DisBack's path), then the LoRA adapters.

        `build_distiller` and the run builder call it; a distiller built by hand must call it before training.
        """
        self.use_lora()

    def use_lora(self) -> None:
        """Train LoRA adapters instead of all weights as `options.lora` says (nothing at rank 0): on the generator's
        UNet and, with `lora.critic`, on each critic's UNet (a GAN head trains fully).

        Called last by `finalize`: the adapters rename the UNets' parameters (onestep.models.lora).
        """
        config = self.options.lora
        if not config.enabled:
            return
        from onestep.models.lora import add_lora

        critics = [u.module for u in self.updates() if u.module is not self.generator] if config.critic else []
        for network in (self.generator, *critics):
            add_lora(network.unet, config)

    def draw(self, generator, conditions: ConditionSampler | None = None, step: int = 0,
             batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Condition]:
        """x = G(z, c) for a fresh batch: (x, the conditions' indices, the Condition).

        `generator` is the module to differentiate through (the trainer's prepared copy, or self.generator under
        no_grad); `step` > 0 first runs the multi-step generator's backward simulation without gradient.
        """
        sampler = conditions or self.conditions
        n = batch_size or self.batch_size
        index = sampler.draw(n)
        condition = sampler.condition(index, self.device)
        noise = torch.randn((n, *self.teacher.sample_shape), device=self.device)
        x_t = self.generator.simulate(noise, condition, step) if step else None
        return generator(noise, condition, step, x_t), index, condition

    def checkpointed(self) -> list:
        """What the trainer's checkpoints keep beside the networks: the real-image stream's position."""
        real = getattr(self, "real", None)
        return [real] if hasattr(real, "state_dict") else []

    # --- what the trainer reports and writes -------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return {} if self.judge is None else self.judge.generator_metrics(self.generator, self.teacher)

    def sample_images(self) -> torch.Tensor | None:
        return None if self.judge is None else self.judge.generator_grid(self.generator, self.teacher)

    def sample_labels(self) -> list[str] | None:
        return None if self.judge is None else self.judge.grid_prompts()

    def export_pipeline(self, out_dir: Path) -> None:
        from onestep.export.pipeline import export_generator

        export_generator(self.generator, self.teacher, out_dir, self.export_readout, self.options.lora.export)
