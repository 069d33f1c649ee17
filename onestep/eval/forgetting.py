"""Forgetting metrics (SFD): how often a generator still draws a forgotten class, and quality on the rest."""

from __future__ import annotations

from collections.abc import Callable

import torch

from onestep.eval.classifier import DigitsClassifier
from onestep.eval.fd import EvalError
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


def forgetting_report(sample: Callable[[torch.Tensor], torch.Tensor], num_classes: int, forget: list[int],
                      num_samples: int, features: str = "digits", reference: str = "digits",
                      metric: str = "fd_digits", classifier: str = "digits") -> dict[str, float]:
    """SFD's two measures for any sampler: `sample(labels)` returns uint8 images, one per requested label.

    Per forgotten class c, `num_samples // num_classes` samples asked for c give the unlearning accuracy and its
    complement, the share still classified as c by the `classifier` judge ("digits", "digits_mlp");
    `num_samples` class-balanced samples over the remaining classes give the FD on those classes in `features`
    (against the same classes' real digits when `reference` is "digits").
    """
    from onestep.eval.classifier import load_judge
    from onestep.eval.fd import frechet_distance
    from onestep.eval.sampling import balanced_labels

    bad = [c for c in forget if not 0 <= c < num_classes]
    if bad:
        raise EvalError(f"forget class {bad[0]} does not exist: classes are 0..{num_classes - 1}")
    if num_samples < num_classes:
        raise EvalError(f"forgetting metrics need at least {num_classes} samples (one per class), got {num_samples}")
    judge = load_judge(classifier)
    per_class = num_samples // num_classes
    out = {"samples_per_forgotten_class": float(per_class)}
    for c in forget:
        ua = unlearning_accuracy(sample(torch.full((per_class,), c)), judge, c)
        out[f"unlearning_accuracy/class_{c}"] = ua
        out[f"classified_as_forgotten/class_{c}"] = 1.0 - ua
    remain = torch.tensor([c for c in range(num_classes) if c not in forget])
    images = sample(remain[balanced_labels(num_samples, len(remain))])
    remain_reference = f"digits:{','.join(map(str, remain.tolist()))}" if reference == "digits" else reference
    out[f"{metric}/remaining_classes"] = frechet_distance(images, remain_reference, features).value
    return out
