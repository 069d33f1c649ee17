"""The evaluators ("judges") of the digits text-to-image teacher: classifiers of 32x32 coloured digits with a digit and
a colour head, whose penultimate features give a Fréchet distance; the metrics they give are in `onestep.eval.t2i`.

Two are shipped, trained differently so that their errors are not the same:
  * "t2i" (FD-t2i): a CNN, 64-d features, the coloured first half of `split_halves(seed=0)`, ±2-pixel shifts and
    brightness (scripts/train_t2i_classifier.py);
  * "t2i_mlp" (FD-t2i_mlp): an MLP on 2x2-average-pooled pixels (no convolution), 128-d features, the coloured
    second half, another seed, ±1-pixel shifts, blur, per-channel gain and pixel noise, label smoothing
    (scripts/train_t2i_mlp_classifier.py).
Both take (N, 3, 32, 32) in [-1, 1] and return (digit logits, colour logits); `features` gives the FD features.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from onestep.eval.quantize import uint8_to_float


ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_T2I_CLASSIFIER_DIR = ASSETS / "digits_t2i_classifier"
# feature-network name -> shipped weights; every t2i judge is also a registered feature network of that name
T2I_JUDGES = {"t2i": DEFAULT_T2I_CLASSIFIER_DIR, "t2i_mlp": ASSETS / "digits_t2i_mlp_classifier"}


class DigitAndColourHeads(nn.Module):
    """Both t2i judges' read-out: the features of a `body`, then a digit head and a colour head on them."""

    body: nn.Module
    digit_head: nn.Linear
    colour_head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit logits, colour logits)."""
        h = self.body(x)
        return self.digit_head(h), self.colour_head(h)


class ColouredDigitsClassifier(DigitAndColourHeads, ModelMixin, ConfigMixin):
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


class ColouredDigitsMLP(DigitAndColourHeads, ModelMixin, ConfigMixin):
    """2x2 average pooling of (N, 3, 32, 32) in [-1, 1] to 3x16x16, flattened -> Linear ReLU Dropout (`hidden`
    widths) -> Linear(-> num_features) SiLU, the features of FD-t2i_mlp, then a digit head (10) and a colour head (4).

    The second t2i judge: no convolution and no pooling beyond the input's, so no translation prior but what its
    training shifts teach it (a CNN's errors and an MLP's are not the same ones). The 2x2 pooling keeps the weights
    under 1 MB; the data are 8x8 digits upsampled, so 16x16 still resolves every stroke."""

    @register_to_config
    def __init__(self, hidden: tuple[int, ...] = (256,), num_features: int = 128, num_digits: int = 10,
                 num_colours: int = 4, dropout: float = 0.0):
        super().__init__()
        widths = [3 * 16 * 16, *hidden]
        layers: list[nn.Module] = [nn.AvgPool2d(2), nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers, nn.Linear(widths[-1], num_features), nn.SiLU())
        self.digit_head = nn.Linear(num_features, num_digits)
        self.colour_head = nn.Linear(num_features, num_colours)


T2IClassifier = ColouredDigitsClassifier | ColouredDigitsMLP
_CLASSES = {cls.__name__: cls for cls in (ColouredDigitsClassifier, ColouredDigitsMLP)}


def load_t2i_classifier(path: str | Path | None = None) -> T2IClassifier:
    """A t2i judge's classifier from its folder (default: the first judge's), of the class its config names."""
    from onestep.files import read_json

    folder = Path(path) if path is not None else DEFAULT_T2I_CLASSIFIER_DIR
    name = read_json(folder / "config.json").get("_class_name") if (folder / "config.json").is_file() else None
    model = _CLASSES.get(name, ColouredDigitsClassifier).from_pretrained(folder)
    return model.eval().requires_grad_(False)


def load_t2i_judge(name: str = "t2i") -> T2IClassifier:
    """A shipped t2i judge by its feature-network name ("t2i", "t2i_mlp")."""
    if name not in T2I_JUDGES:
        from onestep.errors import EvalError

        raise EvalError(f"no t2i classifier for features {name!r}: choose from {', '.join(T2I_JUDGES)}")
    return load_t2i_classifier(T2I_JUDGES[name])


class T2IFeatures(nn.Module):
    """uint8 (N, 3, 32, 32) images -> a t2i judge's features (64-d for FD-t2i, 128-d for FD-t2i_mlp); its own copy of
    the classifier (a metric may cast it)."""

    def __init__(self, classifier: T2IClassifier):
        super().__init__()
        self.classifier = copy.deepcopy(classifier)
        self.num_features = classifier.config.num_features  # torchmetrics reads it instead of probing at 299x299

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(uint8_to_float(images).to(next(self.classifier.parameters()).dtype))


@torch.no_grad()
def classify(classifier: T2IClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digits and colour indices of uint8 images."""
    digits, colours = [], []
    device = next(classifier.parameters()).device
    for start in range(0, len(images), 1000):
        d, c = classifier(uint8_to_float(images[start:start + 1000].to(device)))
        digits.append(d.argmax(1))
        colours.append(c.argmax(1))
    return torch.cat(digits), torch.cat(colours)
