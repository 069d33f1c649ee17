"""Training a (class-conditional) diffusers UNet from data with the denoising loss: how the digits teacher is made."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from onestep.models.conditioning import Condition
from onestep.models.denoising import denoising_loss
from onestep.models.unet import unet_forward
from onestep.training.updates import LossOutput, OptimizerConfig, Update


@dataclass
class DenoiserOptions:
    """`options:` of a teacher-training config."""

    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DModel kwargs
    scheduler: dict[str, Any] = field(default_factory=dict)  # DDPMScheduler kwargs
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW
    ema_decay: float | None = 0.999  # EMA decay of the exported denoiser
    label_dropout: float = 0.1  # share of labels (captions) replaced by the null class (empty prompt) for CFG
    eval_steps: int = 10  # DDIM steps of the periodic FD evaluation
    export_dtype: str = "float32"  # float16 halves the shipped size
    # latent text-to-image teachers (captioned data): the UNet is a UNet2DConditionModel then
    vae: str | None = None  # a trained AutoencoderKL folder (`method: vae`'s exported pipeline/): train in its latents
    text_encoder: dict[str, Any] = field(default_factory=dict)  # CLIPTextConfig kwargs: random, frozen
    text_encoder_seed: int = 0  # its initialisation (the second and third encoders: seed + 1, + 2)
    # a flow-matching transformer teacher in SD3's layout instead of a UNet (StableDiffusion3Pipeline):
    transformer: dict[str, Any] = field(default_factory=dict)  # SD3Transformer2DModel kwargs; scheduler: FlowMatch...
    text_encoder_2: dict[str, Any] = field(default_factory=dict)  # CLIP-G: CLIPTextConfig kwargs (projecting)
    text_encoder_3: dict[str, Any] = field(default_factory=dict)  # T5: T5Config kwargs (d_model = joint_attention_dim)
    eval_guidance: float = 4.0  # guidance scale of the periodic sample grid

    def validate(self) -> None:
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.optimizer.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")


class DenoiserTraining:
    """The teacher's own training: x0 ~ data, t ~ U{0..T-1}, denoising loss, labels dropped to the null class.

    `real` (set once the UNet, hence the image size, exists) gives the images and their labels: RealImages or
    StreamingImages (onestep.data).
    """

    def __init__(self, options: DenoiserOptions, num_classes: int | None, batch_size: int, evaluator=None):
        self.options, self.batch_size, self.evaluator = options, batch_size, evaluator
        self.num_classes, self.real = num_classes, None
        unet_kwargs = dict(options.unet)
        if num_classes is not None:
            unet_kwargs["num_class_embeds"] = num_classes + 1  # + the null class
        self.unet = UNet2DModel(**unet_kwargs)
        self.scheduler = DDPMScheduler(**options.scheduler)
        from onestep.models.teacher import Teacher

        self.teacher_view = Teacher(self.unet, self.scheduler, num_classes=num_classes, frozen=False)

    def updates(self) -> list[Update]:
        return [Update("unet", self.unet, self.loss, self.options.optimizer, ema_decay=self.options.ema_decay)]

    def loss(self, unet: torch.nn.Module) -> LossOutput:
        device = next(unet.parameters()).device
        x0, condition = self.real.sample(self.batch_size, device)
        if condition.class_labels is not None:
            labels = condition.class_labels.clone()
            labels[torch.rand(self.batch_size, device=device) < self.options.label_dropout] = self.num_classes
            condition = Condition(class_labels=labels)
        net = functools.partial(unet_forward, unet)
        loss = denoising_loss(net, self.teacher_view.schedule, x0, condition).mean()
        return LossOutput(loss)

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        return self.evaluator.teacher_metrics(self.teacher_view, steps=[self.options.eval_steps])

    def sample_images(self) -> torch.Tensor | None:
        if self.evaluator is None:
            return None
        return self.evaluator.teacher_grid(self.teacher_view, steps=50)

    def export_pipeline(self, out_dir: Path) -> None:
        from onestep.export.pipeline import export_denoiser

        export_denoiser(self.unet, self.scheduler, out_dir, getattr(torch, self.options.export_dtype))
