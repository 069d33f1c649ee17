"""The small digits classifiers ("judges"): their penultimate activations give a Fréchet distance (FD-digits,
FD-digits_mlp) and their argmax gives class shares and forgetting.

Two are shipped, trained differently so that their errors are not the same (scripts/train_classifier.py):
  * "digits": a CNN (the FD-digits feature net), first half of `split_halves(seed=0)`, ±1-pixel shifts;
  * "digits_mlp": an MLP on the raw pixels (no convolution, no pooling), first half of `split_halves(seed=1)`,
    ±1-pixel shifts plus pixel noise, label smoothing, another seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CLASSIFIER_DIR = ASSETS / "digits_classifier"
# feature-network name -> shipped weights; every digits judge is also a registered feature network of that name
DIGITS_JUDGES = {"digits": DEFAULT_CLASSIFIER_DIR, "digits_mlp": ASSETS / "digits_mlp_classifier"}


class DigitsClassifier(ModelMixin, ConfigMixin):
    """A digits classifier: `body` → (N, num_features) SiLU features → Linear(→num_classes).

    architecture "cnn": Conv(1→c1) Conv(c1→c1) maxpool Conv(c1→c2) maxpool (ReLU) → Linear(4·c2→num_features);
    architecture "mlp": Linear(64→h1) ReLU ... Linear(→num_features) on the flattened pixels (`hidden` widths).

    Inputs are (N, 1, 8, 8) floats in [-1, 1] (the digits data's range). The feature layer uses SiLU, not ReLU:
    ReLU left about half of the 64 features dead on every real digit, and a rank-deficient covariance wastes
    dimensions and makes the Fréchet distance's matrix square root ill-conditioned.
    """

    @register_to_config
    def __init__(self, channels: tuple[int, int] = (32, 64), num_features: int = 64, num_classes: int = 10,
                 architecture: str = "cnn", hidden: tuple[int, ...] = (256, 256), dropout: float = 0.0):
        super().__init__()
        if architecture == "cnn":
            c1, c2 = channels
            layers = [nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(c2 * 4, num_features)]
        elif architecture == "mlp":
            widths = [64, *hidden]
            layers = [nn.Flatten()]
            for a, b in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(widths[-1], num_features))
        else:
            raise ValueError(f"architecture must be cnn or mlp, got {architecture!r}")
        self.body = nn.Sequential(*layers, nn.SiLU())
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


def load_judge(name: str = "digits") -> DigitsClassifier:
    """A shipped digits judge by its feature-network name ("digits", "digits_mlp")."""
    if name not in DIGITS_JUDGES:
        from onestep.errors import EvalError

        raise EvalError(f"no digits classifier for features {name!r}: choose from {', '.join(DIGITS_JUDGES)}")
    return load_digits_classifier(DIGITS_JUDGES[name])
