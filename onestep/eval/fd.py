"""Fréchet distances through torchmetrics' FrechetInceptionDistance, on uint8 images, with cached reference statistics.

Feature networks come by name from `onestep.eval.features` ("digits": FD-digits, "inception": FID, "t2i": FD-t2i, or
a registered one). A reference is "digits" (all 1797 digits images, or "digits:1,2" for some classes), "digits_t2i"
(all 7188 coloured digits of the miniature text-to-image teacher), a STATS.npz (ours, or a
pytorch-fid / clean-fid file holding only mu and sigma) or an IMAGE_DIR, streamed in batches. Statistics of image
references are cached on disk under a key of the feature network's weights, its protocol and the reference's content
(`stats_cache_dir()`), so a reference is read through the network once, not at every evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from onestep.data.digits import load_digits_tensors, split_halves
from onestep.eval.features import (  # noqa: F401  (EvalError, DigitsFeatures, metric_name: public through here)
    FEATURES,
    DigitsFeatures,
    EvalError,
    FeatureOptions,
    default_inception_weights,
    feature_spec,
    metric_name,
)
from onestep.eval.quantize import to_uint8
from onestep.files import atomic_file


STATS_KEYS = ("mu", "sigma", "num_samples", "features")
DIGITS_T2I = "digits_t2i"  # the reference of the miniature text-to-image teacher: its 7188 coloured digits


@dataclass
class ReferenceStats:
    """Mean and covariance of reference features (what a STATS.npz holds); num_samples 0 = not stated (a
    pytorch-fid / clean-fid file), features "" = not stated."""

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


def new_metric(features: str = "digits", inception_weights: str | Path | None = None, classifier=None,
               options: FeatureOptions | None = None) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance over uint8 images (float64 sums) that keeps its real statistics across `reset()`.

    Args:
        features: a registered feature network ("digits", "inception", ...).
        inception_weights: Inception only; default `default_inception_weights()` (shorthand for options).
        classifier: digits only; default the shipped classifier.
        options: what building the feature network needs (weights file, pickle permission).
    """
    spec = feature_spec(features)
    options = options or FeatureOptions(inception_weights=inception_weights)
    network = DigitsFeatures(classifier) if features == "digits" and classifier is not None else spec.build(options)
    metric = FrechetInceptionDistance(feature=network, normalize=False, reset_real_features=False)
    # set_dtype casts the network and every state: the sums are float64 already, so only a float64 network asks it
    return metric.set_dtype(torch.float64) if spec.dtype == torch.float64 else metric


def check_images(images: torch.Tensor, features: str, what: str = "images") -> torch.Tensor:
    """Validate uint8 (N, C, H, W) images for `features`; 1-channel images are repeated to 3 for 3-channel networks."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvalError(f"{what} must be a uint8 tensor (N, C, H, W) (quantise with to_uint8), got {desc}")
    spec = feature_spec(features)
    if spec.image_shape is not None and images.shape[1:] != spec.image_shape:
        raise EvalError(f"{features} features need (N, {', '.join(map(str, spec.image_shape))}) {what}, "
                        f"got {tuple(images.shape)}")
    if spec.channels == 3:
        if images.shape[1] not in (1, 3):
            raise EvalError(f"{features} features need 1- or 3-channel {what}, got {images.shape[1]} channels")
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


def compute_stats(images: torch.Tensor | Iterable[torch.Tensor], features: str = "digits",
                  inception_weights: str | Path | None = None, batch_size: int = 500,
                  device: str | torch.device | None = None, options: FeatureOptions | None = None) -> ReferenceStats:
    """Reference statistics of uint8 (N, C, H, W) images, or of an iterable of such batches (streamed)."""
    metric = new_metric(features, inception_weights, options=options)
    batches = [images] if isinstance(images, torch.Tensor) else images
    metric = metric.to(device if device is not None else "cpu")
    for batch in batches:
        add_images(metric, check_images(batch, features, "reference images"), real=True, batch_size=batch_size)
    if int(metric.real_features_num_samples) < 2:
        raise EvalError("reference statistics need at least 2 images")
    return _stats_from_metric(metric, features)


def save_stats(stats: ReferenceStats, path: str | Path) -> Path:
    """Write a STATS.npz (mu, sigma, num_samples, features) atomically."""
    with atomic_file(path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(stats.num_samples),
                 features=np.str_(stats.features))
    return Path(path)


def load_stats(path: str | Path, features: str | None = None) -> ReferenceStats:
    """Read a STATS.npz: ours, or a pytorch-fid / clean-fid file with only `mu` and `sigma` (then the feature
    network is not stated in the file; it must be the one asked for). With `features`, ours must match it."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in STATS_KEYS if k in data}
    except (OSError, ValueError, EOFError) as err:
        raise EvalError(f"cannot read reference statistics {path}: {str(err).splitlines()[0]}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise EvalError(f"{path} lacks {' and '.join(k for k in ('mu', 'sigma') if k not in arrays)} "
                        "(reference statistics hold mu and sigma)")
    try:
        stats = ReferenceStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64),
                               int(arrays.get("num_samples", 0)), str(arrays.get("features", "")))
    except (TypeError, ValueError) as err:
        raise EvalError(f"{path}: unreadable statistics ({err})") from None
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if d < 1 or stats.sigma.shape != (d, d) or stats.num_samples == 1 or stats.num_samples < 0:
        raise EvalError(f"{path}: mu must be (d,), sigma (d, d) and num_samples >= 2; got mu {stats.mu.shape}, "
                        f"sigma {stats.sigma.shape}, num_samples {stats.num_samples}")
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        raise EvalError(f"{path}: mu and sigma must be finite")
    if features is not None and stats.features and stats.features != features:
        raise EvalError(f"{path} holds {stats.features} statistics, but features={features!r} was asked for")
    return stats


def load_stats_into_metric(metric: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set the metric's real running sums so that compute() is the Fréchet distance to N(stats.mu, stats.sigma)."""
    if stats.mu.shape != tuple(metric.real_features_sum.shape):
        raise EvalError(f"reference statistics are {stats.mu.shape[0]}-d ({stats.features or 'features unstated'}), "
                        f"the metric's features are {metric.real_features_sum.shape[0]}-d")
    n = stats.num_samples or 2  # mu and sigma alone: any n >= 2 gives back the same mean and covariance
    mu = torch.as_tensor(stats.mu, dtype=torch.float64)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64)
    for name, value in (("real_features_sum", n * mu),
                        ("real_features_cov_sum", (n - 1) * sigma + n * torch.outer(mu, mu)),
                        ("real_features_num_samples", torch.tensor(n))):
        old = getattr(metric, name)
        setattr(metric, name, value.to(dtype=old.dtype, device=old.device))


# --- references ------------------------------------------------------------------------------------------------
def stats_cache_dir() -> Path:
    """Where reference statistics are cached: $ONESTEP_CACHE/fd_stats, else $XDG_CACHE_HOME (~/.cache)/onestep/."""
    root = os.environ.get("ONESTEP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "onestep"
    return Path(root) / "fd_stats"


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a network's state (names, shapes, dtypes, values): the feature network part of a cache key."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digits_reference(reference: str) -> torch.Tensor:
    if reference == DIGITS_T2I:
        from onestep.data.digits_t2i import coloured_digits

        return to_uint8(coloured_digits()[0])
    images, labels = load_digits_tensors()
    if reference.startswith("digits:"):
        try:
            classes = [int(c) for c in reference[len("digits:"):].split(",")]
        except ValueError:
            raise EvalError(f"reference {reference!r}: expected digits:CLASS,CLASS,...") from None
        images = images[torch.isin(labels, torch.tensor(classes))]
    return to_uint8(images)


def is_digits_reference(reference: str | Path) -> bool:
    """A reference built from the digits data sets: "digits", "digits:CLASSES" or "digits_t2i"."""
    return str(reference) in ("digits", DIGITS_T2I) or str(reference).startswith("digits:")


def check_reference(reference: str | Path, features: str, options: FeatureOptions | None = None) -> None:
    """Cheap checks, before a long run, that a Fréchet distance can be computed as asked: the feature network's
    files (Inception weights), the reference (digits, a readable STATS.npz of these features, an image folder)."""
    from onestep.eval.features import inception_weights
    from onestep.eval.image_files import image_files

    feature_spec(features)
    if features == "inception":
        inception_weights((options or FeatureOptions()).inception_weights)
    if is_digits_reference(reference):
        _digits_reference(str(reference))
    elif Path(reference).suffix == ".npz":
        load_stats(reference, features)
    else:
        image_files(Path(reference))


def _reference_batches(reference: str | Path, features: str, batch_size: int) -> tuple[str, Iterator[torch.Tensor]]:
    """(content digest, uint8 batches) of an image reference: the digits data or an IMAGE_DIR."""
    from onestep.eval.image_files import folder_digest, iter_image_batches

    if is_digits_reference(reference):
        images = _digits_reference(str(reference))
        digest = hashlib.sha256(str(reference).encode() + images.numpy().tobytes()).hexdigest()
        return digest, iter(images.split(batch_size))
    path = Path(reference)
    if not path.is_dir():
        raise EvalError(f"reference must be 'digits', 'digits_t2i', a STATS.npz or an IMAGE_DIR; {path} is none of "
                        "these")
    return folder_digest(path), iter_image_batches(path, feature_spec(features).channels, batch_size)


def reference_stats(reference: str | Path, metric: FrechetInceptionDistance, features: str,
                    protocol: dict, batch_size: int = 500, cache: bool = True) -> ReferenceStats:
    """Statistics of `reference` in the feature space of `metric` (a fresh one): read from a STATS.npz, or computed
    from the images (streamed) and cached under a key of the network's weights, the protocol and the reference's
    content."""
    if Path(reference).suffix == ".npz":
        return load_stats(reference, features)
    digest, batches = _reference_batches(reference, features, batch_size)
    key_source = {"network": module_digest(metric.inception), "reference": digest, "features": features,
                  "protocol": {k: v for k, v in protocol.items() if k != "weights"}}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:32]
    cached = stats_cache_dir() / f"{features}-{key}.npz"
    if cache and cached.is_file():
        try:
            return load_stats(cached, features)
        except EvalError:
            pass  # a damaged cache entry is recomputed and replaced
    for batch in batches:  # `metric` holds no real features yet: they become the reference's
        add_images(metric, check_images(batch, features, "reference images"), real=True, batch_size=batch_size)
    if int(metric.real_features_num_samples) < 2:
        raise EvalError(f"reference {reference} needs at least 2 images")
    stats = _stats_from_metric(metric, features)
    if cache:
        save_stats(stats, cached)
    return stats


class FrechetDistance:
    """A Fréchet distance to a fixed reference, fed generated uint8 batches; `reset()` keeps the reference.

    The training judge and `onestep fid` both use it, so their numbers and protocols are the same.
    """

    def __init__(self, features: str = "digits", reference: str | Path = "digits",
                 options: FeatureOptions | None = None, device: str | torch.device = "cpu", batch_size: int = 500,
                 classifier=None, cache: bool = True):
        spec = feature_spec(features)
        self.features, self.reference, self.batch_size = features, str(reference), batch_size
        options = options or FeatureOptions()
        self.metric = new_metric(features, classifier=classifier, options=options).to(device)
        self.base_protocol = {"metric": metric_name(features), "features": features, **spec.protocol(options),
                              "reference": self.reference}
        self.stats = reference_stats(reference, self.metric, features, self.base_protocol, batch_size, cache)
        load_stats_into_metric(self.metric, self.stats)

    def reset(self) -> None:
        self.metric.reset()

    def update(self, images: torch.Tensor) -> None:
        add_images(self.metric, check_images(images, self.features), real=False, batch_size=self.batch_size)

    def compute(self) -> float:
        if int(self.metric.fake_features_num_samples) < 2:
            raise EvalError("a Fréchet distance needs at least 2 images")
        return float(self.metric.compute())

    def protocol(self) -> dict:
        return {**self.base_protocol, "num_samples": int(self.metric.fake_features_num_samples),
                "num_reference": self.stats.num_samples or None}


def frechet_distance(images: torch.Tensor | Iterable[torch.Tensor], reference: str | Path = "digits",
                     features: str = "digits", inception_weights: str | Path | None = None, batch_size: int = 500,
                     device: str | torch.device | None = None, options: FeatureOptions | None = None) -> FDResult:
    """Fréchet distance of uint8 (N, C, H, W) images (or an iterable of such batches) to `reference`.

    Args:
        images: generated images, uint8 (quantise with `to_uint8`).
        reference: "digits" (all 1797 digits images), "digits:1,2,..." (those classes), a STATS.npz, or an IMAGE_DIR.
        features: "digits" (score named FD-digits), "inception" (score named FID), or a registered network.
        inception_weights: Inception only; default `default_inception_weights()` (shorthand for options).
        batch_size: images per feature-extractor call.
        device: where features are computed; default the images' device (CPU for an iterable).
        options: what building the feature network needs.

    Raises:
        EvalError: bad images, reference or features, or Inception asked for without its weights.
    """
    options = options or FeatureOptions(inception_weights=inception_weights)
    if isinstance(images, torch.Tensor):
        images = check_images(images, features)
        device = device if device is not None else images.device
        images = [images]
    fd = FrechetDistance(features, reference, options, device or "cpu", batch_size)
    for batch in images:
        fd.update(batch)
    return FDResult(fd.compute(), fd.protocol())


def real_vs_real_floor(seed: int = 0, classifier=None) -> FDResult:
    """FD-digits between the two halves of `split_halves(labels, seed)`: the best score a sampler can expect."""
    images, labels = load_digits_tensors()
    first, second = split_halves(labels.numpy(), seed)
    images = to_uint8(images)
    metric = new_metric("digits", classifier=classifier)
    add_images(metric, images[second], real=True)
    add_images(metric, images[first], real=False)
    return FDResult(float(metric.compute()), {
        "metric": metric_name("digits"),
        "features": "digits" if classifier is None else "digits (features of the given classifier)",
        "reference": f"digits second half (split_halves seed={seed})", "num_samples": len(first),
        "num_reference": len(second)})
