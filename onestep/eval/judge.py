"""Scores what a run produces: balanced samples from fixed noise, fed to the run's metrics, protocol kept.

Every teacher kind is judged: class-conditional (class-balanced labels), unconditional, and text-to-image (the eval
prompts, cycled, so each prompt is asked for N / K or N / K + 1 times). The metrics are the same objects
`onestep fid` uses (`onestep.eval.metrics`): a Fréchet distance (FD-digits, FID, a registered feature space) and any
listed in `eval.metrics` (CLIP score, an evaluator's classifier metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from onestep.eval.features import metric_key, metric_name
from onestep.eval.metrics import MetricContext, SampleBatch, SampleMetric
from onestep.models.conditioning import Condition
from onestep.models.teacher import Teacher
from onestep.sampling.teacher import sample_teacher, sampler_label


def cycle(items: list[str], n: int) -> list[str]:
    """items[0], items[1], ..., items[K-1], items[0], ...: n of them, balanced over the items."""
    return [items[i % len(items)] for i in range(n)]


class Judge:
    """Metrics of `num_samples` balanced samples, always from the same noise (seed), against `reference`.

    Uses its own torch.Generator so that evaluating never moves the training RNG (resume stays exact).

    Args:
        features: the Fréchet distance's feature network ("digits", "inception", a registered one), or None for
            no Fréchet distance (a text teacher judged by `metrics` only).
        prompts: a text teacher's eval prompts (cycled); `validation_prompts` those of the sample grid (default:
            the first 8 eval prompts).
        metrics: names of further metrics (`onestep.eval.metrics.register_metric`), e.g. ["clip_score"].
        context: what building the metrics needs (Inception weights, CLIP model folder, ...).
        forget_prompts: a text teacher's forgotten prompts (SFD): every metric is also reported on the eval prompts
            among them (`<key>/forget_prompts`) and on the others (`<key>/remaining_prompts`).
    """

    def __init__(self, num_samples: int = 1000, features: str | None = "digits", reference: str = "digits",
                 num_classes: int | None = None, seed: int = 1234, batch_size: int = 500,
                 forget_classes: list[int] | None = None, classes: list[int] | None = None,
                 prompts: list[str] | None = None, validation_prompts: list[str] | None = None,
                 metrics: list[str] = (), context: MetricContext | None = None, forget_prompts: list[str] = ()):
        self.num_samples, self.features, self.reference = num_samples, features, reference
        self.num_classes, self.seed, self.batch_size = num_classes, seed, batch_size
        self.forget_classes, self.forget_prompts = list(forget_classes or []), list(forget_prompts)
        self.classes = list(classes) if classes is not None else (list(range(num_classes)) if num_classes else None)
        self.prompts = list(prompts) if prompts else None
        self.validation_prompts = list(validation_prompts) if validation_prompts else (self.prompts or [])[:8]
        self.metric_names, self.context = list(metrics), context or MetricContext(batch_size=batch_size)
        self._metrics: list[SampleMetric] | None = None

    def for_classes(self, classes: list[int]) -> Judge:
        """The same protocol on a subset of the classes (an MSD student's slice), against those classes' digits."""
        reference = f"digits:{','.join(map(str, classes))}" if self.reference == "digits" else self.reference
        return Judge(self.num_samples, self.features, reference, self.num_classes, self.seed, self.batch_size,
                     classes=classes, metrics=self.metric_names, context=self.context)

    @property
    def metric_name(self) -> str:
        """The key of the Fréchet distance in metrics.json (fd_digits, fid, ...)."""
        return metric_key(self.features) if self.features else "fd"

    @property
    def protocol(self) -> str:
        """How every number this judge reports was produced (stored next to the numbers)."""
        if self.prompts:
            balance = f"prompt-balanced ({len(self.prompts)} eval prompts, cycled) "
        elif self.num_classes:
            balance = "class-balanced "
            if self.classes is not None and len(self.classes) < self.num_classes:
                balance = f"class-balanced (classes {self.classes}) "
        else:
            balance = ""
        if self._metrics is not None:  # once built, each metric states its own protocol
            scores = [f"{p.get('metric', m.key)}: " + ", ".join(f"{k} {v}" for k, v in p.items()
                                                              if k not in ("metric", "num_samples"))
                      for m in self._metrics for p in [m.protocol()]]
        else:
            scores = [f"{metric_name(self.features)}: features {self.features}, reference {self.reference}"] \
                if self.features else []
            scores += self.metric_names
        return f"{'; '.join(scores)}; N={self.num_samples} {balance}samples from fixed noise (seed {self.seed})"

    # --- what is asked for --------------------------------------------------------------------------------------
    def requests(self, n: int) -> tuple[torch.Tensor | None, list[str] | None]:
        """Balanced class labels over this judge's classes, or cycled eval prompts, or neither (unconditional)."""
        from onestep.eval.sampling import balanced_labels

        if self.prompts:
            return None, cycle(self.prompts, n)
        if self.num_classes is None:
            return None, None
        return torch.as_tensor(self.classes)[balanced_labels(n, len(self.classes))], None

    @staticmethod
    def _condition(teacher: Teacher, labels: torch.Tensor | None, prompts: list[str] | None) -> Condition:
        if prompts is not None:
            return teacher.condition(prompts=prompts).to(teacher.device)
        return Condition() if labels is None else Condition(class_labels=labels.to(teacher.device))

    def _generator(self, device) -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed)

    # --- metrics ------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail now, not at the end of a run, on what would stop the metrics being built: a missing Inception weights
        file, reference or CLIP model folder (reference statistics themselves are computed at the first evaluation,
        on the training device)."""
        from onestep.eval.fd import check_reference
        from onestep.eval.metrics import EvalError

        if self.features:
            check_reference(self.reference, self.features, self.context.features)
        if "clip_score" in self.metric_names and not (Path(self.context.clip_model or "") / "config.json").is_file():
            raise EvalError("clip_score needs a local CLIP model folder with config.json, got "
                            f"{self.context.clip_model}")

    def metrics(self, device: torch.device | str) -> list[SampleMetric]:
        """The metric objects, built once (reference statistics are read or computed then, never again)."""
        if self._metrics is None:
            from onestep.eval.metrics import FrechetMetric, build_metric

            self.context.device = device
            built = [FrechetMetric(self.features, self.reference, self.context)] if self.features else []
            self._metrics = built + [build_metric(name, self.context) for name in self.metric_names]
        return self._metrics

    def score_batches(self, batches: Iterator[SampleBatch], device: torch.device | str) -> dict[str, float]:
        """{metric key: value} over every batch."""
        from onestep.eval.metrics import run_metrics

        values, _ = run_metrics(self.metrics(device), batches)
        return values

    def _stream(self, draw: Callable[[int, torch.Tensor | None, list[str] | None], torch.Tensor], n: int,
                labels: torch.Tensor | None = None, prompts: list[str] | None = None) -> Iterator[SampleBatch]:
        """SampleBatches of `draw(m, labels, prompts)` (images in [-1, 1]) over n requests, batch by batch."""
        from onestep.eval.quantize import to_uint8

        if labels is None and prompts is None:
            labels, prompts = self.requests(n)
        for start in range(0, n, self.batch_size):
            m = min(self.batch_size, n - start)
            batch_labels = None if labels is None else labels[start:start + m]
            batch_prompts = None if prompts is None else prompts[start:start + m]
            yield SampleBatch(to_uint8(draw(m, batch_labels, batch_prompts)), batch_labels, batch_prompts)

    # --- teachers (teacher training, TSM) -----------------------------------------------------------------------
    def _teacher_draw(self, teacher: Teacher, steps: int, sampler: str, guidance_scale: float | None):
        rng = self._generator(teacher.device)

        @torch.no_grad()
        def draw(m: int, labels, prompts) -> torch.Tensor:
            condition = self._condition(teacher, labels, prompts)
            latents = sample_teacher(teacher, condition, m, steps, sampler, guidance_scale, generator=rng,
                                     batch_size=m)
            return teacher.decode(latents).clamp(-1, 1)

        return draw

    def teacher_metrics(self, teacher: Teacher, steps: list[int], sampler: str = "ddim",
                        guidance_scale: float | None = None) -> dict[str, float]:
        if not self.metrics(teacher.device):
            return {}  # nothing to score (a text teacher without eval metrics): no samples drawn for nothing
        out = {}
        for k in steps:
            start = time.perf_counter()
            values = self.score_batches(self._stream(self._teacher_draw(teacher, k, sampler, guidance_scale),
                                                     self.num_samples), teacher.device)
            elapsed = time.perf_counter() - start
            label = f"teacher_{sampler_label(teacher, sampler)}{k}"  # teacher_ddim25; a flow teacher's teacher_euler25
            out.update({f"{key}/{label}": value for key, value in values.items()})
            out[f"images_per_s/{label}"] = self.num_samples / elapsed
        return {**out, "protocol": self.protocol}

    # --- generators -----------------------------------------------------------------------------------------------
    def _generator_draw(self, generator, teacher: Teacher):
        rng = self._generator(teacher.device)

        @torch.no_grad()
        def draw(m: int, labels, prompts) -> torch.Tensor:
            condition = self._condition(teacher, labels, prompts)
            noise = torch.randn((m, *teacher.sample_shape), generator=rng, device=teacher.device)
            return teacher.decode(generator.sample(noise, condition, generator=rng)).clamp(-1, 1)

        return draw

    @torch.no_grad()
    def generator_samples(self, generator, teacher: Teacher, n: int,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images of the (possibly multi-step) generator from this judge's fixed noise.

        `labels` default to this judge's requests (balanced labels or cycled prompts)."""
        return torch.cat([batch.images for batch in self._stream(self._generator_draw(generator, teacher), n, labels)])

    def generator_metrics(self, generator, teacher: Teacher) -> dict[str, float]:
        if not self.metrics(teacher.device) and not self.forget_classes:
            return {}  # nothing to score (a text teacher without eval metrics): no samples drawn for nothing
        start = time.perf_counter()
        values = self.score_batches(self._stream(self._generator_draw(generator, teacher), self.num_samples),
                                    teacher.device)
        elapsed = time.perf_counter() - start
        metrics = {**{f"{key}/student": value for key, value in values.items()},
                   "images_per_s/student": self.num_samples / elapsed, "protocol": self.protocol}
        if self.forget_classes:
            metrics.update(self.forgetting_metrics(generator, teacher))
        if self.forget_prompts and self.prompts:
            metrics.update(self.prompt_forgetting_metrics(generator, teacher))
        return metrics

    def forgetting_metrics(self, generator, teacher: Teacher) -> dict[str, float]:
        """SFD's measures: unlearning accuracy per forgotten class, FD on the remaining classes."""
        from onestep.eval.classifier import DIGITS_JUDGES
        from onestep.eval.forgetting import forgetting_report

        def sample(labels: torch.Tensor) -> torch.Tensor:
            return self.generator_samples(generator, teacher, len(labels), labels)

        classifier = self.features if self.features in DIGITS_JUDGES else "digits"
        return forgetting_report(sample, self.num_classes, self.forget_classes, self.num_samples, self.features,
                                 self.reference, self.metric_name, classifier)

    def prompt_forgetting_metrics(self, generator, teacher: Teacher) -> dict[str, float]:
        """SFD's measures for a text teacher: the metrics on the forgotten eval prompts (e.g. digit_acc there is the
        share still drawn as the forgotten prompt asks) and on the remaining ones, each from the fixed noise."""
        forget = set(self.forget_prompts)
        out = {}
        for split, prompts in (("forget_prompts", [p for p in self.prompts if p in forget]),
                               ("remaining_prompts", [p for p in self.prompts if p not in forget])):
            if prompts:
                values = self.score_batches(self._stream(self._generator_draw(generator, teacher), len(prompts),
                                                         prompts=prompts), teacher.device)
                out.update({f"{key}/{split}": value for key, value in values.items()} | {f"num_{split}": len(prompts)})
        return out

    # --- sample grids -----------------------------------------------------------------------------------------------
    def grid_requests(self, per_row: int) -> tuple[int, torch.Tensor | None, list[str] | None]:
        """`per_row` images per class (labels 0,0,..,1,1,..) or per validation prompt; a square for unconditional
        models."""
        if self.validation_prompts:
            return len(self.validation_prompts) * per_row, None, \
                [p for p in self.validation_prompts for _ in range(per_row)]
        if self.num_classes is None:
            return per_row * per_row, None, None
        return len(self.classes) * per_row, torch.as_tensor(self.classes).repeat_interleave(per_row), None

    def grid_prompts(self) -> list[str] | None:
        """The prompt of each image of the default sample grid (None: class-conditional or unconditional)."""
        return self.grid_requests(self._grid_per_row())[2]

    def _grid_per_row(self) -> int:
        # the grid writer lays N images out ceil(sqrt(N)) wide: K prompts x K images is one row per prompt
        return max(len(self.validation_prompts), 2) if self.validation_prompts else 10

    def teacher_grid(self, teacher: Teacher, steps: int = 50, per_class: int | None = None) -> torch.Tensor:
        from onestep.eval.quantize import to_uint8

        n, labels, prompts = self.grid_requests(per_class or self._grid_per_row())
        condition = self._condition(teacher, labels, prompts)
        latents = sample_teacher(teacher, condition, n, steps, generator=self._generator(teacher.device))
        return to_uint8(teacher.decode(latents).clamp(-1, 1))

    @torch.no_grad()
    def generator_grid(self, generator, teacher: Teacher, per_class: int | None = None) -> torch.Tensor:
        from onestep.eval.quantize import to_uint8

        n, labels, prompts = self.grid_requests(per_class or self._grid_per_row())
        return to_uint8(self._generator_draw(generator, teacher)(n, labels, prompts))


def digits_t2i_judge(num_samples: int = 1000, seed: int = 1234, batch_size: int = 500):
    """The judge of the digits-t2i teacher and its students: `eval_prompts(num_samples)` (half coloured, half
    uncoloured) from fixed noise, FD-t2i against all 7188 real coloured digits, the three metrics above and the
    second judge's FD (FD-t2i_mlp) on the same samples."""
    from onestep.data.digits_t2i import eval_prompts, validation_prompts
    from onestep.eval.t2i import SECOND_JUDGE_METRIC, T2I_METRICS

    return Judge(num_samples, "t2i", "digits_t2i", seed=seed, batch_size=batch_size,
                 prompts=eval_prompts(num_samples)[0], validation_prompts=validation_prompts(),
                 metrics=[*T2I_METRICS, SECOND_JUDGE_METRIC])
