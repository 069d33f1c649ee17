"""Feature networks for Fréchet distances, by name: "digits" (FD-digits), "digits_mlp" (FD-digits_mlp, the second
digits judge), "inception" (FID), "t2i" (FD-t2i, the digits text-to-image evaluator), "t2i_mlp" (FD-t2i_mlp, the second
one), and any registered one.

A feature network maps uint8 (N, C, H, W) images to (N, d) features and has an int `num_features`. Registering
one (`register_features`) makes it usable everywhere a Fréchet distance is computed: `eval.features`, the training
judge, `onestep fid --features NAME`. What `protocol` returns is stored beside every number it produces.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from onestep.errors import EvalError
from onestep.eval.quantize import uint8_to_float


INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
INCEPTION_SAFETENSORS_NAME = "inception-2015-12-05.safetensors"


@dataclass
class FeatureOptions:
    """What building a feature network may need: the Inception weights file, whether a pickle may be read."""

    inception_weights: str | Path | None = None
    allow_pickle: bool = False
    extra: dict = field(default_factory=dict)  # for registered networks (e.g. a folder of their weights)


@dataclass
class FeatureSpec:
    """A named feature network: `build(options)` returns it (eval mode); `channels` are what it takes (1 or 3),
    `image_shape` the (C, H, W) it insists on (None: any size)."""

    build: Callable[[FeatureOptions], nn.Module]
    channels: int
    protocol: Callable[[FeatureOptions], dict]
    dtype: torch.dtype = torch.float64  # the network's compute dtype inside the metric
    image_shape: tuple[int, int, int] | None = None


FEATURES: dict[str, FeatureSpec] = {}


def register_features(name: str, build: Callable[[FeatureOptions], nn.Module], channels: int = 3,
                      protocol: Callable[[FeatureOptions], dict] | None = None,
                      dtype: torch.dtype = torch.float64, image_shape: tuple[int, int, int] | None = None) -> None:
    """Make a feature network available as `features=name` (its score is called FD-<name>)."""
    FEATURES[name] = FeatureSpec(build, channels, protocol or (lambda options: {"extractor": name}), dtype,
                                 image_shape)


def feature_spec(name: str) -> FeatureSpec:
    if name not in FEATURES:
        raise EvalError(f"features must be one of {', '.join(sorted(FEATURES))}, got {name!r}")
    return FEATURES[name]


def metric_name(features: str) -> str:
    """`FID` for Inception features only, `FD-<features>` otherwise (a digits-feature score is never FID)."""
    return "FID" if features == "inception" else f"FD-{features}"


def metric_key(features: str) -> str:
    """The key of the score in metrics.json: fid, fd_digits, fd_<features>."""
    return "fid" if features == "inception" else f"fd_{features}"


class DigitsFeatures(nn.Module):
    """uint8 (N, 1, 8, 8) -> a digits classifier's penultimate activations (N, 64), for torchmetrics.

    The classifier is the given one, else the shipped `judge` ("digits", "digits_mlp"). Holds its own copy of a
    given classifier: the metric's `set_dtype(torch.float64)` casts the copy, not the caller's network.
    """

    def __init__(self, classifier=None, judge: str = "digits"):
        from onestep.eval.classifier import load_judge

        super().__init__()
        self.classifier = copy.deepcopy(classifier) if classifier is not None else load_judge(judge)
        self.num_features = self.classifier.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.classifier.parameters()).dtype
        return self.classifier.features(uint8_to_float(images).to(dtype))


def default_inception_weights() -> Path:
    """Where Inception weights are looked for when none are named: torch.hub.get_dir()/checkpoints/, the
    safetensors file first, then torch-fidelity's pickle (read only when pickle is allowed)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    safetensors = folder / INCEPTION_SAFETENSORS_NAME
    return safetensors if safetensors.is_file() or not (folder / INCEPTION_WEIGHTS_NAME).is_file() \
        else folder / INCEPTION_WEIGHTS_NAME


def inception_weights(path: str | Path | None) -> Path:
    """The Inception weights file to use; one EvalError saying where to put it when it is not there."""
    target = Path(path) if path is not None else default_inception_weights()
    if not target.is_file():
        raise EvalError(f"Inception weights not found at {target}: download {INCEPTION_WEIGHTS_NAME} from "
                        f"{INCEPTION_WEIGHTS_URL} where you have network, convert it once with "
                        f"scripts/convert_inception_weights.py, and pass --inception-weights FILE "
                        f"(eval.inception_weights) or put it at {target.parent / INCEPTION_SAFETENSORS_NAME}")
    return target


def _build_inception(options: FeatureOptions) -> nn.Module:
    from onestep.eval.inception import load_inception

    return load_inception(inception_weights(options.inception_weights), options.allow_pickle)


def _inception_protocol(options: FeatureOptions) -> dict:
    from onestep.eval.inception import INPUT_SIZE, RESIZE

    return {"extractor": "Inception-v3 pool3 (2048-d), the FID network of torch-fidelity / pytorch-fid",
            "weights": str(inception_weights(options.inception_weights)), "resize": RESIZE, "antialias": False,
            "input_size": INPUT_SIZE, "dtype": "float32"}


register_features("digits", lambda options: DigitsFeatures(), channels=1, image_shape=(1, 8, 8),
                  protocol=lambda options: {"extractor": "digits classifier penultimate layer (64-d)",
                                            "resize": "none (8x8 input)", "dtype": "float64"})
# the second digits judge: an MLP trained differently (onestep/assets/digits_mlp_classifier/README.md)
register_features("digits_mlp", lambda options: DigitsFeatures(judge="digits_mlp"), channels=1, image_shape=(1, 8, 8),
                  protocol=lambda options: {"extractor": "digits MLP classifier penultimate layer (64-d)",
                                            "resize": "none (8x8 input)", "dtype": "float64"})
register_features("inception", _build_inception, channels=3, protocol=_inception_protocol, dtype=torch.float32)


def _t2i_builder(name: str) -> Callable[[FeatureOptions], nn.Module]:
    """Build the t2i judge `name` ("t2i", "t2i_mlp"): the shipped one, or the folder `extra["<name>_classifier"]`."""
    def build(options: FeatureOptions) -> nn.Module:
        from onestep.eval.t2i_classifier import T2I_JUDGES, T2IFeatures, load_t2i_classifier

        return T2IFeatures(load_t2i_classifier(options.extra.get(f"{name}_classifier") or T2I_JUDGES[name]))

    return build


def _t2i_protocol(name: str, extractor: str) -> Callable[[FeatureOptions], dict]:
    def protocol(options: FeatureOptions) -> dict:
        folder = options.extra.get(f"{name}_classifier") or f"onestep/assets/digits_{name}_classifier"
        return {"extractor": extractor, "resize": "none (32x32 input)", "dtype": "float32", "classifier": str(folder)}

    return protocol


# FD-t2i: the miniature text-to-image teacher's evaluator (onestep.eval.t2i), against reference "digits_t2i"
register_features("t2i", _t2i_builder("t2i"), channels=3, dtype=torch.float32, image_shape=(3, 32, 32),
                  protocol=_t2i_protocol("t2i", "digits-t2i classifier penultimate layer (64-d)"))
# the second t2i judge: an MLP trained differently (onestep/assets/digits_t2i_mlp_classifier/README.md)
register_features("t2i_mlp", _t2i_builder("t2i_mlp"), channels=3, dtype=torch.float32, image_shape=(3, 32, 32),
                  protocol=_t2i_protocol("t2i_mlp", "digits-t2i MLP classifier penultimate layer (128-d)"))
