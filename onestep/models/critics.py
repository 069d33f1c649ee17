"""Trainable critics: the fake-score network (a teacher copy tracking the generator), the GAN heads that read its
encoder features (DMD2's, SiDA's; a flow transformer's token features at chosen depths) and the adversarial losses
both methods use."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onestep.models.conditioning import Condition
from onestep.models.schedules import Schedule
from onestep.models.unet import trainable_copy, unet_forward, unet_x0
from onestep.pipelines.pipeline_onestep import is_flow_transformer


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


class TokenClassifier(nn.Module):
    """DMD2's GAN head on a transformer (FastGen / DMD2 #62 read several depths): per depth a LayerNorm and a
    2-layer MLP give each token a logit; the logit is their mean over tokens and depths."""

    def __init__(self, dim: int, num_depths: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
                                   for _ in range(num_depths))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(f.float()).squeeze(-1).mean(1) for head, f in zip(self.heads, features,
                                                                                  strict=True)]).mean(0)


class TokenMeanHead(nn.Module):
    """SiDA's parameter-free head on a transformer: one logit per token and depth, the token's channel mean."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([f.float().mean(-1) for f in features], dim=1)


GAN_HEADS = {"bottleneck": BottleneckClassifier, "mean": ChannelMeanHead}
DEFAULT_DEPTHS = (0.5, 0.75, 1.0)  # of a transformer's blocks, the GAN head's features (FastGen's ~50/75/99%)


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """A flow transformer's blocks in order: SD3's joint blocks; FLUX's double-stream then single-stream blocks."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def blocks_at_depths(num_blocks: int, depths: list[float] | tuple[float, ...]) -> list[int]:
    """The block indices at fractional depths d in (0, 1] (the block that ends the first d of the network)."""
    if not depths or any(not 0 < d <= 1 for d in depths):
        raise ValueError(f"gan_depths must be fractions in (0, 1], got {list(depths)}")
    return sorted({max(0, math.ceil(d * num_blocks) - 1) for d in depths})


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))), in float32 (the head's logits are bf16 under autocast)."""
    return F.softplus(-fake_logits.float())


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)), in float32."""
    return F.softplus(fake_logits.float()) + F.softplus(-real_logits.float())


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, eq. 9, without its gamma / 2): the per-sample ||grad_x D(x)||^2 at the real inputs
    x the logits were computed from (x must require grad; a multi-logit head's D is the sum of its logits).

    The gradient keeps its graph (`create_graph`) so that minimising the penalty trains the discriminator: a double
    backward through the network that computed the logits.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return grad.float().square().flatten(1).sum(1)


class _Bottleneck(Exception):
    """Raised by the last feature hook (a UNet's mid block, a transformer's deepest chosen block) to end a pass early
    when only the GAN logit is wanted."""

    def __init__(self, features: list[torch.Tensor]):
        super().__init__()
        self.features = features


class FakeScore(nn.Module):
    """x0-prediction of the generator's current distribution: a trainable float32 copy of the teacher UNet.

    With a `gan_head` (`bottleneck`: DMD2's BottleneckClassifier, `mean`: SiDA's ChannelMeanHead; True means
    bottleneck) the head reads the UNet's mid-block output, captured by a forward hook (diffusers' forward is left
    untouched). A logit-only pass stops after the mid block, skipping the decoder; `x0+logits` / `raw+logits` take
    the logit from the same pass as the prediction. A flow transformer's head reads the image tokens after the blocks
    at fractional `gan_depths` (TokenClassifier / TokenMeanHead), and a logit-only pass stops after the deepest.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, gan_head: bool | str = False,
                 gan_depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.head: nn.Module | None = None
        self._capture: str | None = None  # None, "stop" (raise at the last feature layer) or "keep" (store, run on)
        self._features: list[torch.Tensor] = []
        self._layers: list[nn.Module] = []  # whose outputs the head reads
        self._tokens = is_flow_transformer(unet)
        kind = "bottleneck" if gan_head is True else gan_head or None
        if kind is not None and kind not in GAN_HEADS:
            raise ValueError(f"gan_head must be one of {', '.join(GAN_HEADS)}, got {gan_head!r}")
        if kind is not None and self._tokens:
            blocks = transformer_blocks(unet)
            self._layers = [blocks[i] for i in blocks_at_depths(len(blocks), gan_depths)]
            dim = unet.config.num_attention_heads * unet.config.attention_head_dim
            self.head = TokenClassifier(dim, len(self._layers)) if kind == "bottleneck" else TokenMeanHead()
        elif kind == "bottleneck":
            channels = unet.config.block_out_channels[-1]
            size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
            resolution = size // 2 ** (len(unet.config.block_out_channels) - 1)
            groups = math.gcd(channels, getattr(unet.config, "norm_num_groups", None) or 32)
            self.head = BottleneckClassifier(channels, resolution, groups)
        elif kind == "mean":
            self.head = ChannelMeanHead()
        if self.head is not None and not self._tokens:
            self._layers = [unet.mid_block]
        for layer in self._layers:
            layer.register_forward_hook(self._read_features)

    @classmethod
    def from_teacher(cls, teacher_unet: nn.Module, schedule: Schedule, gan_head: bool | str = False,
                     share_frozen: bool = False,
                     gan_depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS) -> FakeScore:
        """A float32, trainable copy of the teacher's UNet, or one sharing its frozen weights (a LoRA base)."""
        return cls(trainable_copy(teacher_unet, share_frozen), schedule, gan_head, gan_depths)

    def _read_features(self, module: nn.Module, inputs, output) -> None:
        if self._capture is None:
            return
        if self._tokens:  # a transformer block returns (text states, image tokens)
            features = output[1]
        else:  # a UNet's mid block, its feature map
            features = output[0] if isinstance(output, tuple) else output
        self._features.append(features)
        if module is self._layers[-1] and self._capture == "stop":
            raise _Bottleneck(self._features)

    def _head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The logit of the captured features (a UNet head takes its one feature map)."""
        if self._tokens:
            return self.head(features)
        return self.head(features[0])

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
        self._capture, self._features = "stop", []
        try:
            unet_x0(self.unet, self.schedule, x_t, t, condition)
        except _Bottleneck as stop:
            return self._head(stop.features)
        finally:
            self._capture, self._features = None, []
        raise RuntimeError("the network's feature layers did not run")

    def _with_logits(self, output: str, x_t: torch.Tensor, t: torch.Tensor,
                     condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_head()
        self._capture, self._features = "keep", []
        try:
            prediction = self.forward(x_t, t, condition, output)
            features = self._features[:len(self._layers)]
        finally:
            self._capture, self._features = None, []
        return prediction, self._head(features)
