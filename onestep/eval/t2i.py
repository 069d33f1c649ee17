"""The metrics of the digits text-to-image teacher (`builtin:digits-t2i`) and its students, through the metrics
interface (`onestep.eval.metrics`): its classifier's features give FD-t2i (`features: t2i`, reference
`digits_t2i`, registered in `onestep.eval.features`); this module registers

  * `digit_acc`: share of samples whose classified digit is the one their prompt names;
  * `colour_acc`: the same for the colour, on prompts that name one;
  * `colour_balance`: on prompts that name no colour, max over the four colours of |share - 1/4| (0: all four
    equally often; a sampler that paints every uncoloured prompt one colour scores 0.75).

  * `fd_t2i_mlp`: FD-t2i_mlp, the Fréchet distance in the second t2i judge's features against `digits_t2i`, so
    that a run judged by FD-t2i (`eval.features: t2i`) records both judges' distances on the same samples.

`eval.metric_options.t2i_classifier` (`FeatureOptions.extra` for FD-t2i) names another classifier folder, for
FD-t2i and the three classifier metrics (the second judge's folder gives them by the MLP);
`t2i_mlp_classifier` does so for FD-t2i_mlp.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from onestep.eval.metrics import MetricContext, PerSampleMetric, SampleBatch, SampleMetric, register_metric


T2I_METRICS = ("digit_acc", "colour_acc", "colour_balance")
SECOND_JUDGE_METRIC = "fd_t2i_mlp"  # FD in the second t2i judge's features, as a metric beside FD-t2i
T2I_CLASSIFIER_OPTION = "t2i_classifier"  # eval.metric_options key: the classifier folder (default: the shipped one)


@lru_cache(maxsize=4)
def _classifier(folder: str | None, device: str):
    from onestep.eval.t2i_classifier import load_t2i_classifier

    return load_t2i_classifier(folder).to(device)


def _requested(prompts: list[str] | None, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(digits, colour indices) the prompts ask for, -1 where a prompt names none."""
    from onestep.data.digits_t2i import parse_caption
    from onestep.eval.features import EvalError

    if prompts is None:
        raise EvalError(f"{key} needs prompts (the digits text-to-image teacher or one of its students)")
    parsed = [parse_caption(p) for p in prompts]
    return (torch.tensor([-1 if d is None else d for d, _ in parsed]),
            torch.tensor([-1 if c is None else c for _, c in parsed]))


class _Predictions:
    """The classifier's (digit, colour) predictions of a batch, with what each prompt asked for."""

    def __init__(self, ctx: MetricContext, key: str):
        self.folder = ctx.extra.get(T2I_CLASSIFIER_OPTION)
        self.device, self.key = str(ctx.device), key

    def __call__(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from onestep.eval.t2i_classifier import classify

        pred_digits, pred_colours = classify(_classifier(self.folder, self.device), batch.images)
        return (pred_digits.cpu(), pred_colours.cpu(), *_requested(batch.prompts, self.key))

    def protocol(self) -> dict:
        return {"classifier": self.folder or "onestep/assets/digits_t2i_classifier"}


def _accuracy(key: str, what: str) -> Callable[[MetricContext], SampleMetric]:
    """A PerSampleMetric: the share of samples classified as the `what` ("digit" / "colour") their prompt names,
    over the samples whose prompt names one."""
    column = ("digit", "colour").index(what)

    def build(ctx: MetricContext) -> SampleMetric:
        predict = _Predictions(ctx, key)

        def score(batch: SampleBatch) -> torch.Tensor:
            predictions = predict(batch)
            predicted, requested = predictions[column], predictions[2 + column]
            return (predicted == requested)[requested >= 0].float()

        return PerSampleMetric(key, score, f"share of samples for prompts naming a {what} classified as that {what} "
                               f"({predict.protocol()['classifier']})")

    return build


class ColourBalance(SampleMetric):
    """max over the four colours of |share - 1/4| among samples whose prompt names no colour."""

    key = "colour_balance"

    def __init__(self, ctx: MetricContext):
        self.predict = _Predictions(ctx, self.key)
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.long)

    def update(self, batch: SampleBatch) -> None:
        _, pred, _, colours = self.predict(batch)
        self.counts += torch.bincount(pred[colours < 0], minlength=4)

    def compute(self) -> float:
        from onestep.eval.features import EvalError

        total = int(self.counts.sum())
        if not total:
            raise EvalError("colour_balance: no sample of a prompt naming no colour")
        return float((self.counts.double() / total - 0.25).abs().max())

    def shares(self) -> list[float]:
        """The share of each colour (red, green, blue, yellow) among the uncoloured prompts' samples."""
        return (self.counts.double() / max(int(self.counts.sum()), 1)).tolist()

    def protocol(self) -> dict:
        from onestep.data.digits_t2i import COLOUR_NAMES

        return {"metric": self.key, "definition": "max |share - 1/4| over the four colours, samples of prompts "
                "naming no colour", "num_samples": int(self.counts.sum()), **self.predict.protocol(),
                "shares": dict(zip(COLOUR_NAMES, [round(s, 4) for s in self.shares()], strict=True))}


register_metric("digit_acc", _accuracy("digit_acc", "digit"))
register_metric("colour_acc", _accuracy("colour_acc", "colour"))
register_metric("colour_balance", ColourBalance)


def _second_judge_fd(ctx: MetricContext) -> SampleMetric:
    from onestep.eval.metrics import FrechetMetric

    return FrechetMetric("t2i_mlp", "digits_t2i", ctx)


register_metric(SECOND_JUDGE_METRIC, _second_judge_fd)
