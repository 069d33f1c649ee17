"""Fréchet distance through torchmetrics' FrechetInceptionDistance, on uint8 images, with cached reference statistics.

Two feature extractors: "digits" (the shipped classifier's 64-d penultimate activations; the score is called
FD-digits) and "inception" (the standard pool3 protocol; the score is called FID). A reference is "digits" (all 1797
digits images), a STATS.npz (keys mu, sigma, num_samples, features) or an IMAGE_DIR of images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from onestep.data.digits import load_digits_tensors, split_halves
from onestep.data.folders import load_image_folder
from onestep.errors import UserInputError
from onestep.eval.classifier import DigitsClassifier, load_digits_classifier
from onestep.eval.quantize import to_uint8, uint8_to_float
from onestep.files import atomic_file


FEATURES = ("digits", "inception")
STATS_KEYS = ("mu", "sigma", "num_samples", "features")
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


class EvalError(UserInputError):
    """Evaluation cannot run as asked (bad images, reference or feature setup); the message is one line."""


class DigitsFeatures(nn.Module):
    """uint8 (N, 1, 8, 8) -> the digits classifier's penultimate activations (N, 64), for torchmetrics.

    Holds its own copy of a given classifier: the metric's `set_dtype(torch.float64)` casts the copy, not the
    caller's network.
    """

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = copy.deepcopy(classifier) if classifier is not None else load_digits_classifier()
        self.num_features = self.classifier.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.classifier.parameters()).dtype
        return self.classifier.features(uint8_to_float(images).to(dtype))


@dataclass
class ReferenceStats:
    """Mean and covariance of reference features (what a STATS.npz holds)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    features: str


@dataclass
class FDResult:
    """A Fréchet distance and the protocol that produced it."""

    value: float
    protocol: dict

    def to_dict(self) -> dict:
        """JSON-ready: {"value": ..., "protocol": {...}}."""
        return {"value": self.value, "protocol": dict(self.protocol)}


def metric_name(features: str) -> str:
    """`FID` for Inception features only, `FD-<features>` otherwise (a digits-feature score is never FID)."""
    return "FID" if features == "inception" else f"FD-{features}"


def default_inception_weights() -> Path:
    """Where torch-fidelity looks for the Inception weights: torch.hub.get_dir()/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def _inception_weights(path: str | Path | None) -> Path:
    """The weights file, checked together with torch-fidelity; one EvalError naming everything that is missing."""
    target = Path(path) if path is not None else default_inception_weights()
    missing = []
    try:
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        missing.append("pip install 'onestep[inception]' (torch-fidelity + torchvision)")
    if not target.is_file():
        missing.append(f"put {INCEPTION_WEIGHTS_NAME} (from {INCEPTION_WEIGHTS_URL}) at {target}")
    if missing:
        raise EvalError(f"Inception features are not available offline: {'; and '.join(missing)}")
    return target


def new_metric(features: str = "digits", inception_weights: str | Path | None = None,
               classifier: DigitsClassifier | None = None) -> FrechetInceptionDistance:
    """A float64 FrechetInceptionDistance over uint8 images that keeps its real statistics across `reset()`.

    Args:
        features: "digits" or "inception".
        inception_weights: Inception only; default `default_inception_weights()`.
        classifier: digits only; default the shipped classifier.
    """
    if features == "digits":
        metric = FrechetInceptionDistance(feature=DigitsFeatures(classifier), normalize=False,
                                          reset_real_features=False)
    elif features == "inception":
        metric = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False, reset_real_features=False,
                                          feature_extractor_weights_path=str(_inception_weights(inception_weights)))
    else:
        raise EvalError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    return metric.set_dtype(torch.float64)


def check_images(images: torch.Tensor, features: str, what: str = "images") -> torch.Tensor:
    """Validate uint8 (N, C, H, W) images for `features`; 1-channel images are repeated to 3 for Inception."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvalError(f"{what} must be a uint8 tensor (N, C, H, W) (quantise with to_uint8), got {desc}")
    if len(images) < 2:
        raise EvalError(f"a Fréchet distance needs at least 2 {what}, got {len(images)}")
    if features == "digits" and images.shape[1:] != (1, 8, 8):
        raise EvalError(f"digits features need (N, 1, 8, 8) {what}, got {tuple(images.shape)}")
    if features == "inception":
        if images.shape[1] not in (1, 3):
            raise EvalError(f"Inception features need 1- or 3-channel {what}, got {images.shape[1]} channels")
        return images.expand(-1, 3, -1, -1)
    return images


def add_images(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch_size: int = 500) -> None:
    """Feed checked uint8 images to `metric` in batches on the metric's device."""
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size].to(metric.device), real=real)


def _stats_from_metric(metric: FrechetInceptionDistance, features: str) -> ReferenceStats:
    """The real-side mean and (unbiased) covariance, exactly as FrechetInceptionDistance.compute() forms them."""
    n = metric.real_features_num_samples.double()
    mu = metric.real_features_sum.double() / n
    sigma = (metric.real_features_cov_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    return ReferenceStats(mu.cpu().numpy(), sigma.cpu().numpy(), int(n.item()), features)


def compute_stats(images: torch.Tensor, features: str = "digits", inception_weights: str | Path | None = None,
                  batch_size: int = 500, device: str | torch.device | None = None) -> ReferenceStats:
    """Reference statistics of uint8 (N, C, H, W) images."""
    images = check_images(images, features, "reference images")
    metric = new_metric(features, inception_weights).to(device if device is not None else images.device)
    add_images(metric, images, real=True, batch_size=batch_size)
    return _stats_from_metric(metric, features)


def save_stats(stats: ReferenceStats, path: str | Path) -> Path:
    """Write a STATS.npz (mu, sigma, num_samples, features) atomically."""
    with atomic_file(path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(stats.num_samples),
                 features=np.str_(stats.features))
    return Path(path)


def load_stats(path: str | Path, features: str | None = None) -> ReferenceStats:
    """Read a STATS.npz; with `features`, it must have been computed with those features."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in STATS_KEYS if k in data}
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot read reference statistics {path}: {err}") from None
    missing = [k for k in STATS_KEYS if k not in arrays]
    if missing:
        raise EvalError(f"{path} lacks {', '.join(missing)} (a STATS.npz holds mu, sigma, num_samples, features)")
    stats = ReferenceStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64),
                           int(arrays["num_samples"]), str(arrays["features"]))
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if d < 1 or stats.sigma.shape != (d, d) or stats.num_samples < 2:
        raise EvalError(f"{path}: mu must be (d,), sigma (d, d) and num_samples >= 2; got mu {stats.mu.shape}, "
                        f"sigma {stats.sigma.shape}, num_samples {stats.num_samples}")
    if features is not None and stats.features != features:
        raise EvalError(f"{path} holds {stats.features} statistics, but features={features!r} was asked for")
    return stats


def load_stats_into_metric(metric: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set the metric's real running sums so that compute() is the Fréchet distance to N(stats.mu, stats.sigma)."""
    if stats.mu.shape != tuple(metric.real_features_sum.shape):
        raise EvalError(f"reference statistics are {stats.mu.shape[0]}-d ({stats.features}), "
                        f"the metric's features are {metric.real_features_sum.shape[0]}-d")
    n = stats.num_samples
    mu = torch.as_tensor(stats.mu, dtype=torch.float64)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64)
    for name, value in (("real_features_sum", n * mu),
                        ("real_features_cov_sum", (n - 1) * sigma + n * torch.outer(mu, mu)),
                        ("real_features_num_samples", torch.tensor(n))):
        old = getattr(metric, name)
        setattr(metric, name, value.to(dtype=old.dtype, device=old.device))


def _load_reference(reference: str | Path, features: str, channels: int) -> ReferenceStats | torch.Tensor:
    """Reference statistics (STATS.npz) or checked uint8 reference images ("digits", "digits:1,2,..." for some
    classes only, or an IMAGE_DIR)."""
    if str(reference) == "digits" or str(reference).startswith("digits:"):
        images, labels = load_digits_tensors()
        if str(reference).startswith("digits:"):
            try:
                classes = [int(c) for c in str(reference)[len("digits:"):].split(",")]
            except ValueError:
                raise EvalError(f"reference {reference!r}: expected digits:CLASS,CLASS,...") from None
            images = images[torch.isin(labels, torch.tensor(classes))]
        return check_images(to_uint8(images), features, "reference images")
    path = Path(reference)
    if path.suffix == ".npz":
        return load_stats(path, features)
    if path.is_dir():
        try:
            images = to_uint8(load_image_folder(path, channels))
        except UserInputError as err:
            raise EvalError(str(err)) from None
        return check_images(images, features, f"reference images in {path}")
    raise EvalError(f"reference must be 'digits', a STATS.npz or an IMAGE_DIR; {path} is none of these")


def frechet_distance(images: torch.Tensor, reference: str | Path = "digits", features: str = "digits",
                     inception_weights: str | Path | None = None, batch_size: int = 500,
                     device: str | torch.device | None = None) -> FDResult:
    """Fréchet distance of uint8 (N, C, H, W) images to `reference` in `features` space.

    Args:
        images: generated images, uint8 (quantise with `to_uint8`).
        reference: "digits" (all 1797 digits images), "digits:1,2,..." (those classes), a STATS.npz, or an IMAGE_DIR.
        features: "digits" (score named FD-digits) or "inception" (score named FID).
        inception_weights: Inception only; default `default_inception_weights()`.
        batch_size: images per feature-extractor call.
        device: where features are computed; default the images' device.

    Raises:
        EvalError: bad images, reference or features, or Inception asked for without its weights.
    """
    images = check_images(images, features)
    metric = new_metric(features, inception_weights).to(device if device is not None else images.device)
    ref = _load_reference(reference, features, channels=images.shape[1])
    if isinstance(ref, ReferenceStats):
        load_stats_into_metric(metric, ref)
    else:
        add_images(metric, ref, real=True, batch_size=batch_size)
    add_images(metric, images, real=False, batch_size=batch_size)
    return FDResult(float(metric.compute()), {
        "metric": metric_name(features), "features": features, "reference": str(reference),
        "num_samples": len(images), "num_reference": int(metric.real_features_num_samples.item())})


def real_vs_real_floor(seed: int = 0, classifier: DigitsClassifier | None = None) -> FDResult:
    """FD-digits between the two halves of `split_halves(labels, seed)`: the best score a sampler can expect."""
    images, labels = load_digits_tensors()
    first, second = split_halves(labels.numpy(), seed)
    images = to_uint8(images)
    metric = new_metric("digits", classifier=classifier)
    add_images(metric, images[second], real=True)
    add_images(metric, images[first], real=False)
    return FDResult(float(metric.compute()), {
        "metric": metric_name("digits"), "features": "digits",
        "reference": f"digits second half (split_halves seed={seed})", "num_samples": len(first),
        "num_reference": len(second)})
