"""Trainable critics: the fake-score network (a teacher copy tracking the generator) and DMD2's GAN head on it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from onestep.conditioning import Condition
from onestep.schedules import VPSchedule
from onestep.unet import unet_forward, unet_x0


class BottleneckClassifier(nn.Module):
    """DMD2's GAN head: a few strided convs on the UNet's mid-block features, then one real/fake logit."""

    def __init__(self, channels: int, resolution: int, num_groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(max(0, int(math.log2(max(resolution, 1))) - 1)):  # downsample to 2x2 (or keep 1x1)
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(num_groups, channels),
                       nn.SiLU()]
        layers += [nn.Conv2d(channels, channels, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(1)


class _Bottleneck(Exception):
    """Raised by the mid-block hook to end a UNet pass early when only the GAN logit is wanted."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


class FakeScore(nn.Module):
    """x0-prediction of the generator's current distribution: a trainable float32 copy of the teacher UNet.

    With `gan_head=True` a BottleneckClassifier reads the UNet's mid-block output, captured by a forward hook
    (diffusers' forward is left untouched). A logit-only pass stops after the mid block, skipping the decoder.
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, gan_head: bool = False):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.head: BottleneckClassifier | None = None
        self._want_features = False
        if gan_head:
            channels = unet.config.block_out_channels[-1]
            size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
            resolution = size // 2 ** (len(unet.config.block_out_channels) - 1)
            groups = math.gcd(channels, getattr(unet.config, "norm_num_groups", None) or 32)
            self.head = BottleneckClassifier(channels, resolution, groups)
            unet.mid_block.register_forward_hook(self._stop_at_bottleneck)

    @classmethod
    def from_teacher(cls, teacher_unet: nn.Module, schedule: VPSchedule, gan_head: bool = False) -> FakeScore:
        unet = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
        return cls(unet, schedule, gan_head)

    def _stop_at_bottleneck(self, module: nn.Module, inputs, output) -> None:
        if self._want_features:
            raise _Bottleneck(output[0] if isinstance(output, tuple) else output)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, output: str = "x0") -> torch.Tensor:
        """`x0`: the x0-prediction (never guided: it models the generator's conditional distribution);
        `raw`: the UNet's own output (for the denoising loss); `logits`: the GAN head's real/fake logit.

        Everything goes through forward so that a DDP-wrapped critic syncs its gradients.
        """
        if output == "x0":
            return unet_x0(self.unet, self.schedule, x_t, t, condition)
        if output == "raw":
            return unet_forward(self.unet, x_t, t, condition)
        if output == "logits":
            return self._logits(x_t, t, condition)
        raise ValueError(f"output must be x0, raw or logits, got {output!r}")

    def _logits(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """Real/fake logit of the GAN head on the UNet's bottleneck features (encoder and mid block only)."""
        if self.head is None:
            raise RuntimeError("this FakeScore was built without a GAN head")
        self._want_features = True
        try:
            unet_x0(self.unet, self.schedule, x_t, t, condition)
        except _Bottleneck as stop:
            return self.head(stop.features)
        finally:
            self._want_features = False
        raise RuntimeError("the UNet's mid block did not run")
