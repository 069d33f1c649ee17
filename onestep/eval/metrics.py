"""Metrics of generated samples behind one interface, built by name: the training judge and `onestep fid` use these.

Built in:
  * the Fréchet distance in a registered feature space (`fd_metric`): FD-digits, FID (Inception weights on disk), ...;
  * `clip_score`: torchmetrics' CLIPScore with a CLIP model from a local folder (`eval.clip_model`, `--clip-model`);
  * `digit_acc`, `colour_acc`, `colour_balance`: the digits text-to-image teacher's evaluator (`onestep.eval.t2i`).

Adding the metrics of another evaluator (e.g. the miniature text-to-image teacher's classifier):
  * a Fréchet distance in its feature space: `onestep.eval.features.register_features("shapes", build, channels=3)`,
    where `build(FeatureOptions)` returns an nn.Module mapping uint8 (N, C, H, W) to (N, d) with an int
    `num_features`; then `eval.features: shapes` / `onestep fid --features shapes` report `fd_shapes`;
  * per-sample scores: `register_metric("shape_accuracy", lambda ctx: PerSampleMetric("shape_accuracy", score))`,
    where `score(batch: SampleBatch) -> (m,) tensor` (one score per sample it applies to, m <= n) sees the uint8
    images with the prompts (or class labels) they were asked for, so a classifier can check that an image shows
    what its prompt says; the metric reports the mean. List it in `eval.metrics` / `onestep fid --metrics
    shape_accuracy`. `ctx.extra` carries `eval.metric_options` (e.g. the folder of the evaluator's weights);
    `ctx.device` is where to put networks.
Register at import time of a module that `onestep.eval` (the package) imports, as it imports `onestep.eval.t2i`
(configs are validated against the registries before training starts); keep heavy imports inside the build functions.
Every metric states its protocol (what it measured and how), which is stored next to its number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onestep.eval.features import EvalError, FeatureOptions, metric_key


@dataclass
class SampleBatch:
    """Generated uint8 (n, C, H, W) images and what each was asked for (class labels and/or prompts)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None


class SampleMetric(ABC):
    """A score of generated samples, fed batch by batch: `reset()`, `update(batch)`..., `compute()`."""

    key: str  # its name in metrics.json (`<key>/student`, ...)

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def update(self, batch: SampleBatch) -> None: ...

    @abstractmethod
    def compute(self) -> float: ...

    @abstractmethod
    def protocol(self) -> dict: ...


@dataclass
class MetricContext:
    """What building a metric may need."""

    device: torch.device | str = "cpu"
    batch_size: int = 500
    features: FeatureOptions = field(default_factory=FeatureOptions)
    clip_model: str | None = None
    extra: dict = field(default_factory=dict)


class FrechetMetric(SampleMetric):
    """The Fréchet distance to a fixed reference in a registered feature space (reference statistics cached)."""

    def __init__(self, features: str, reference: str | Path, ctx: MetricContext, classifier=None):
        from onestep.eval.fd import FrechetDistance

        self.key = metric_key(features)
        self.fd = FrechetDistance(features, reference, ctx.features, ctx.device, ctx.batch_size, classifier)

    def reset(self) -> None:
        self.fd.reset()

    def update(self, batch: SampleBatch) -> None:
        self.fd.update(batch.images)

    def compute(self) -> float:
        return self.fd.compute()

    def protocol(self) -> dict:
        return self.fd.protocol()


class CLIPScoreMetric(SampleMetric):
    """torchmetrics' CLIPScore, max(100 * mean cos(image, prompt), 0), with a CLIP model from a local folder."""

    key = "clip_score"

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise EvalError(f"clip_score needs a local CLIP model folder (CLIPModel + CLIPProcessor "
                            f"save_pretrained), got {path}")

        def load():
            from transformers import CLIPModel, CLIPProcessor

            return _TensorFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path)

        try:
            self.metric = CLIPScore(model_name_or_path=load).to(device)
        except (OSError, ValueError) as err:
            raise EvalError(f"cannot load CLIP model {path}: {str(err).splitlines()[0]}") from None
        self.model_dir, self.count = str(path), 0

    def reset(self) -> None:
        self.metric.reset()
        self.count = 0

    def update(self, batch: SampleBatch) -> None:
        if batch.prompts is None:
            raise EvalError("clip_score needs prompts (a text-to-image model and a prompt file)")
        with torch.no_grad():
            self.metric.update(batch.images.expand(-1, 3, -1, -1).to(self.metric.device), list(batch.prompts))
        self.count += len(batch.prompts)

    def compute(self) -> float:
        return float(self.metric.compute())

    def protocol(self) -> dict:
        return {"metric": "CLIP score", "model": self.model_dir, "num_samples": self.count,
                "definition": "torchmetrics CLIPScore: max(100 * mean cos(image, prompt embedding), 0)"}


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return the projected embeddings as tensors, as torchmetrics 1.9 expects
    (transformers 5 returns a model output holding them as `pooler_output`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class PerSampleMetric(SampleMetric):
    """The mean of a per-sample score `score(batch) -> (m,)` (e.g. a classifier's accuracy on the asked-for class),
    over the samples it applies to (m <= n: e.g. colour accuracy only where the prompt names a colour)."""

    def __init__(self, key: str, score: Callable[[SampleBatch], torch.Tensor], description: str = ""):
        self.key, self.score, self.description = key, score, description
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, batch: SampleBatch) -> None:
        with torch.no_grad():
            values = self.score(batch).detach().double().reshape(-1)
        self.total += float(values.sum())
        self.count += values.numel()

    def compute(self) -> float:
        if not self.count:
            raise EvalError(f"{self.key}: no samples scored")
        return self.total / self.count

    def protocol(self) -> dict:
        return {"metric": self.key, "definition": self.description or "mean of a per-sample score",
                "num_samples": self.count}


METRICS: dict[str, Callable[[MetricContext], SampleMetric]] = {}


def register_metric(name: str, build: Callable[[MetricContext], SampleMetric]) -> None:
    """Make a metric available by name in `eval.metrics` and `onestep fid --metrics`."""
    METRICS[name] = build


def build_metric(name: str, ctx: MetricContext) -> SampleMetric:
    if name not in METRICS:
        raise EvalError(f"unknown metric {name!r}; choose from {', '.join(sorted(METRICS))}")
    return METRICS[name](ctx)


def _clip_score(ctx: MetricContext) -> SampleMetric:
    if not ctx.clip_model:
        raise EvalError("clip_score needs a local CLIP model folder: set eval.clip_model (--clip-model DIR)")
    return CLIPScoreMetric(ctx.clip_model, ctx.device)


register_metric("clip_score", _clip_score)


def run_metrics(metrics: list[SampleMetric], batches) -> tuple[dict[str, float], dict[str, dict]]:
    """Reset `metrics`, feed them every SampleBatch of `batches`, and return {key: value} and {key: protocol}."""
    for metric in metrics:
        metric.reset()
    for batch in batches:
        for metric in metrics:
            metric.update(batch)
    return {m.key: m.compute() for m in metrics}, {m.key: m.protocol() for m in metrics}

