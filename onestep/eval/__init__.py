"""Evaluation: uint8 quantisation, FD-digits / FID through torchmetrics, pluggable metrics, class shares, grids.

Names resolve lazily (PEP 562), so `onestep.eval.to_uint8` does not pay for importing torchmetrics.
"""

from __future__ import annotations

import importlib


_EXPORTS = {
    "DigitsClassifier": "classifier",
    "load_digits_classifier": "classifier",
    "to_uint8": "quantize",
    "uint8_to_float": "quantize",
    "EvalError": "features",  # defined in onestep.errors
    "DigitsFeatures": "features",
    "FeatureOptions": "features",
    "register_features": "features",
    "default_inception_weights": "features",
    "metric_name": "features",
    "FrechetDistance": "fd",
    "FDResult": "fd",
    "ReferenceStats": "fd",
    "frechet_distance": "fd",
    "real_vs_real_floor": "fd",
    "new_metric": "fd",
    "compute_stats": "fd",
    "save_stats": "fd",
    "load_stats": "fd",
    "load_stats_into_metric": "fd",
    "SampleBatch": "metrics",
    "SampleMetric": "metrics",
    "PerSampleMetric": "metrics",
    "register_metric": "metrics",
    "FIDInceptionV3": "inception",
    "load_inception": "inception",
    "balanced_labels": "sampling",
    "class_shares": "sampling",
    "max_share_error": "sampling",
    "save_grid": "grid",
}

__all__ = list(_EXPORTS)

# The built-in per-sample metrics (digit_acc, colour_acc, colour_balance) register when any part of onestep.eval loads.
from onestep.eval import t2i as _t2i  # noqa: E402,F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"onestep.eval.{_EXPORTS[name]}"), name)
