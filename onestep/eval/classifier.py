"""The small digits CNN whose 64-d penultimate activations give FD-digits (and whose argmax gives class shares)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier"


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Conv(1→c1) Conv(c1→c1) pool Conv(c1→c2) pool (ReLU) → Linear(4·c2→num_features) SiLU → Linear(→num_classes).

    Inputs are (N, 1, 8, 8) floats in [-1, 1] (the digits data's range). The feature layer uses SiLU, not ReLU:
    ReLU left about half of the 64 features dead on every real digit, and a rank-deficient covariance wastes
    dimensions and makes the Fréchet distance's matrix square root ill-conditioned.
    """

    @register_to_config
    def __init__(self, channels: tuple[int, int] = (32, 64), num_features: int = 64, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * 4, num_features), nn.SiLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, num_features)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.body(x))


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped classifier (or the `from_pretrained` folder at `path`), in eval mode with gradients off."""
    model = DigitsClassifier.from_pretrained(Path(path) if path is not None else DEFAULT_CLASSIFIER_DIR)
    return model.eval().requires_grad_(False)
