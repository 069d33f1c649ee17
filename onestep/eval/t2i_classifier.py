"""The evaluator of the digits text-to-image teacher: a CNN on 32x32 coloured digits with a digit and a colour head,
and the metrics it gives (FD-t2i, digit accuracy, colour accuracy, colour balance)."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from onestep.eval.quantize import to_uint8, uint8_to_float


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


class _Features(nn.Module):
    """uint8 images -> classifier features, for torchmetrics (its own copy: the metric casts it to float64)."""

    def __init__(self, classifier: ColouredDigitsClassifier):
        super().__init__()
        self.classifier = copy.deepcopy(classifier)
        self.num_features = classifier.config.num_features  # torchmetrics reads it instead of probing at 299x299

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(uint8_to_float(images).to(next(self.classifier.parameters()).dtype))


def _fd_metric(classifier: ColouredDigitsClassifier) -> FrechetInceptionDistance:
    """Features in float32 (the network's own precision), summed and compared in float64 (torchmetrics' states)."""
    return FrechetInceptionDistance(feature=_Features(classifier), normalize=False, reset_real_features=False)


@lru_cache(maxsize=1)
def _reference_metric(classifier_dir: str | None) -> FrechetInceptionDistance:
    """The metric with all 7188 real coloured digits as its real side (computed once per process)."""
    from onestep.data.digits_t2i import coloured_digits

    metric = _fd_metric(load_t2i_classifier(classifier_dir))
    real = to_uint8(coloured_digits()[0])
    with torch.no_grad():
        for start in range(0, len(real), 1000):
            metric.update(real[start:start + 1000], real=True)
    return metric


def fd_t2i(images: torch.Tensor, classifier_dir: str | Path | None = None) -> float:
    """FD-t2i: Fréchet distance between the classifier's features of `images` (uint8 (N, 3, 32, 32)) and of all
    7188 real coloured digits (a Fréchet distance in this classifier's feature space, not Inception FID)."""
    metric = copy.deepcopy(_reference_metric(str(classifier_dir) if classifier_dir else None))
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            metric.update(images[start:start + 1000].cpu(), real=False)
    return float(metric.compute())


@torch.no_grad()
def classify(classifier: ColouredDigitsClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digits and colour indices of uint8 images."""
    digits, colours = [], []
    for start in range(0, len(images), 1000):
        d, c = classifier(uint8_to_float(images[start:start + 1000].cpu()))
        digits.append(d.argmax(1))
        colours.append(c.argmax(1))
    return torch.cat(digits), torch.cat(colours)


def prompt_metrics(pred_digits: torch.Tensor, pred_colours: torch.Tensor, digits: torch.Tensor,
                   colours: torch.Tensor) -> dict[str, float]:
    """Digit accuracy vs the prompts' digits, colour accuracy on coloured prompts (colour >= 0), and colour balance
    on uncoloured prompts (colour -1): max over the four colours of |share - 1/4| (0 = all four equally often)."""
    out = {"digit_acc": (pred_digits == digits).float().mean().item()}
    coloured = colours >= 0
    if coloured.any():
        out["colour_acc"] = (pred_colours[coloured] == colours[coloured]).float().mean().item()
    if (~coloured).any():
        shares = torch.bincount(pred_colours[~coloured], minlength=4).float() / (~coloured).sum()
        out["colour_balance"] = (shares - 0.25).abs().max().item()
    return out
