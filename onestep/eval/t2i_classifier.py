"""The evaluator of the digits text-to-image teacher: a CNN on 32x32 coloured digits with a digit and a colour head,
whose features are those of FD-t2i (`features: t2i`); the metrics it gives are in `onestep.eval.t2i`."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from onestep.eval.quantize import uint8_to_float


DEFAULT_T2I_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_t2i_classifier"


class ColouredDigitsClassifier(ModelMixin, ConfigMixin):
    """(Conv 3x3 ReLU, max-pool) x3 on (N, 3, 32, 32) in [-1, 1] -> Linear(16 c3 -> num_features) SiLU, the features
    of FD-t2i, then two heads: the digit (10 logits) and the colour (4 logits, onestep.data.digits_t2i.COLOUR_NAMES).
    SiLU on the features for the reason DigitsClassifier gives (no dead features, a full-rank covariance)."""

    @register_to_config
    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), num_features: int = 64, num_digits: int = 10,
                 num_colours: int = 4):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c3 * 16, num_features), nn.SiLU(),
        )
        self.digit_head = nn.Linear(num_features, num_digits)
        self.colour_head = nn.Linear(num_features, num_colours)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit logits, colour logits)."""
        h = self.body(x)
        return self.digit_head(h), self.colour_head(h)


def load_t2i_classifier(path: str | Path | None = None) -> ColouredDigitsClassifier:
    model = ColouredDigitsClassifier.from_pretrained(Path(path) if path is not None else DEFAULT_T2I_CLASSIFIER_DIR)
    return model.eval().requires_grad_(False)


class T2IFeatures(nn.Module):
    """uint8 (N, 3, 32, 32) images -> the classifier's 64-d features, the network of FD-t2i (`features: t2i`); its
    own copy of the classifier (a metric may cast it)."""

    def __init__(self, classifier: ColouredDigitsClassifier):
        super().__init__()
        self.classifier = copy.deepcopy(classifier)
        self.num_features = classifier.config.num_features  # torchmetrics reads it instead of probing at 299x299

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(uint8_to_float(images).to(next(self.classifier.parameters()).dtype))


@torch.no_grad()
def classify(classifier: ColouredDigitsClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digits and colour indices of uint8 images."""
    digits, colours = [], []
    device = next(classifier.parameters()).device
    for start in range(0, len(images), 1000):
        d, c = classifier(uint8_to_float(images[start:start + 1000].to(device)))
        digits.append(d.argmax(1))
        colours.append(c.argmax(1))
    return torch.cat(digits), torch.cat(colours)
