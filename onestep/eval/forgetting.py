"""Forgetting metrics (SFD): how often a generator still draws a forgotten class, and quality on the rest."""

from __future__ import annotations

import torch

from onestep.eval.classifier import DigitsClassifier
from onestep.eval.quantize import uint8_to_float


@torch.no_grad()
def unlearning_accuracy(images: torch.Tensor, classifier: DigitsClassifier, forget_class: int) -> float:
    """Share of samples requested as `forget_class` that the classifier does NOT label as it (SFD's UA).

    `images` are uint8 samples all requested with the forgotten class; the count divides by their number.
    """
    if len(images) == 0:
        raise ValueError("unlearning accuracy needs samples of the forgotten class")
    predicted = classifier(uint8_to_float(images)).argmax(dim=1)
    return float((predicted != forget_class).float().mean())
