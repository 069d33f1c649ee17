"""Class-balanced labels for conditional sampling, and the classifier's view of which classes came out."""

from __future__ import annotations

import numpy as np
import torch

from onestep.eval.classifier import DigitsClassifier
from onestep.eval.quantize import uint8_to_float


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """int64 labels 0, 1, .., K-1, 0, 1, ..: n // K of each class, the remainder going to the first classes.

    The cycling order keeps every batch cut from the front of the list (nearly) balanced too.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"balanced_labels needs n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    return torch.arange(n) % num_classes


@torch.no_grad()
def class_shares(images: torch.Tensor, classifier: DigitsClassifier, batch_size: int = 1000) -> np.ndarray:
    """The share of uint8 (N, 1, 8, 8) images the classifier assigns to each class (sums to 1)."""
    param = next(classifier.parameters())
    counts = torch.zeros(classifier.config.num_classes, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        batch = uint8_to_float(images[start:start + batch_size]).to(param)
        counts += torch.bincount(classifier(batch).argmax(1).cpu(), minlength=len(counts))
    return (counts.double() / max(len(images), 1)).numpy()


def max_share_error(shares: np.ndarray, expected: float | np.ndarray) -> float:
    """The largest absolute gap between observed and expected class shares (e.g. expected = 1 / num_classes)."""
    return float(np.max(np.abs(np.asarray(shares, dtype=np.float64) - expected)))
