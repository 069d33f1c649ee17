"""Trainable critics: the fake-score network (a teacher copy tracking the generator), the GAN heads that read its
encoder features (DMD2's, SiDA's) and the adversarial losses both methods use."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onestep.models.conditioning import Condition
from onestep.models.schedules import Schedule
from onestep.models.unet import trainable_copy, unet_forward, unet_x0


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


class ChannelMeanHead(nn.Module):
    """SiDA's discriminator: no parameters, one logit per position of the encoder's output, its channel mean (the
    official `logits = x.mean(dim=1)` on the last encoder features); the shared encoder itself learns to tell
    real from fake."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().mean(1)


GAN_HEADS = {"bottleneck": BottleneckClassifier, "mean": ChannelMeanHead}


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))), in float32 (the head's logits are bf16 under autocast)."""
    return F.softplus(-fake_logits.float())


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)), in float32."""
    return F.softplus(fake_logits.float()) + F.softplus(-real_logits.float())


class _Bottleneck(Exception):
    """Raised by the mid-block hook to end a UNet pass early when only the GAN logit is wanted."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


class FakeScore(nn.Module):
    """x0-prediction of the generator's current distribution: a trainable float32 copy of the teacher UNet.

    With a `gan_head` (`bottleneck`: DMD2's BottleneckClassifier, `mean`: SiDA's ChannelMeanHead; True means
    bottleneck) the head reads the UNet's mid-block output, captured by a forward hook (diffusers' forward is left
    untouched). A logit-only pass stops after the mid block, skipping the decoder; `x0+logits` / `raw+logits` take
    the logit from the same pass as the prediction.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, gan_head: bool | str = False):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.head: nn.Module | None = None
        self._capture: str | None = None  # None, "stop" (raise at the mid block) or "keep" (store, run on)
        self._features: torch.Tensor | None = None
        kind = "bottleneck" if gan_head is True else gan_head or None
        if kind == "bottleneck":
            channels = unet.config.block_out_channels[-1]
            size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
            resolution = size // 2 ** (len(unet.config.block_out_channels) - 1)
            groups = math.gcd(channels, getattr(unet.config, "norm_num_groups", None) or 32)
            self.head = BottleneckClassifier(channels, resolution, groups)
        elif kind == "mean":
            self.head = ChannelMeanHead()
        elif kind is not None:
            raise ValueError(f"gan_head must be one of {', '.join(GAN_HEADS)}, got {gan_head!r}")
        if self.head is not None:
            unet.mid_block.register_forward_hook(self._read_bottleneck)

    @classmethod
    def from_teacher(cls, teacher_unet: nn.Module, schedule: Schedule, gan_head: bool | str = False,
                     share_frozen: bool = False) -> FakeScore:
        """A float32, trainable copy of the teacher's UNet, or one sharing its frozen weights (a LoRA base)."""
        return cls(trainable_copy(teacher_unet, share_frozen), schedule, gan_head)

    def _read_bottleneck(self, module: nn.Module, inputs, output) -> None:
        features = output[0] if isinstance(output, tuple) else output
        if self._capture == "stop":
            raise _Bottleneck(features)
        if self._capture == "keep":
            self._features = features

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
                output: str = "x0") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`x0`: the x0-prediction (never guided: it models the generator's conditional distribution);
        `raw`: the UNet's own output (for the denoising loss); `logits`: the GAN head's real/fake logit;
        `x0+logits`, `raw+logits`: (prediction, logit) of one pass.

        Everything goes through forward so that a DDP-wrapped critic syncs its gradients.
        """
        if output == "x0":
            return unet_x0(self.unet, self.schedule, x_t, t, condition)
        if output == "raw":
            return unet_forward(self.unet, x_t, t, condition, self.schedule)
        if output == "logits":
            return self._logits(x_t, t, condition)
        if output in ("x0+logits", "raw+logits"):
            return self._with_logits(output.split("+")[0], x_t, t, condition)
        raise ValueError(f"output must be x0, raw, logits, x0+logits or raw+logits, got {output!r}")

    def _check_head(self) -> None:
        if self.head is None:
            raise RuntimeError("this FakeScore was built without a GAN head")

    def _logits(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """Real/fake logit of the GAN head on the UNet's bottleneck features (encoder and mid block only)."""
        self._check_head()
        self._capture = "stop"
        try:
            unet_x0(self.unet, self.schedule, x_t, t, condition)
        except _Bottleneck as stop:
            return self.head(stop.features)
        finally:
            self._capture = None
        raise RuntimeError("the UNet's mid block did not run")

    def _with_logits(self, output: str, x_t: torch.Tensor, t: torch.Tensor,
                     condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_head()
        self._capture = "keep"
        try:
            prediction = self.forward(x_t, t, condition, output)
            features, self._features = self._features, None
        finally:
            self._capture = None
        return prediction, self.head(features)
