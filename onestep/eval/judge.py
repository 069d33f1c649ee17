"""Scores what a run produces: class-balanced samples from fixed noise, FD against a fixed reference, protocol kept."""

from __future__ import annotations

import time

import torch

from onestep.conditioning import Condition
from onestep.sampling import sample_teacher
from onestep.teacher import Teacher


class Judge:
    """FD of `num_samples` class-balanced samples, always from the same noise (seed), against `reference`.

    Uses its own torch.Generator so that evaluating never moves the training RNG (resume stays exact).
    """

    def __init__(self, num_samples: int = 1000, features: str = "digits", reference: str = "digits",
                 num_classes: int | None = None, seed: int = 1234, batch_size: int = 500,
                 forget_classes: list[int] | None = None, classes: list[int] | None = None):
        self.num_samples, self.features, self.reference = num_samples, features, reference
        self.num_classes, self.seed, self.batch_size = num_classes, seed, batch_size
        self.forget_classes = list(forget_classes or [])
        self.classes = list(classes) if classes is not None else (list(range(num_classes)) if num_classes else None)

    def for_classes(self, classes: list[int]) -> Judge:
        """The same protocol on a subset of the classes (an MSD student's slice), against those classes' digits."""
        reference = f"digits:{','.join(map(str, classes))}" if self.reference == "digits" else self.reference
        return Judge(self.num_samples, self.features, reference, self.num_classes, self.seed, self.batch_size,
                     classes=classes)

    @property
    def metric_name(self) -> str:
        return "fd_digits" if self.features == "digits" else "fid"

    @property
    def protocol(self) -> str:
        """How every number this judge reports was produced (stored next to the numbers)."""
        balance = "class-balanced " if self.num_classes else ""
        if self.classes is not None and len(self.classes) < self.num_classes:
            balance = f"class-balanced (classes {self.classes}) "
        return (f"{'FD-digits' if self.features == 'digits' else 'FID'}: features {self.features}, reference "
                f"{self.reference}, N={self.num_samples} {balance}samples from fixed noise (seed {self.seed})")

    def condition(self, n: int, device: torch.device | str = "cpu") -> Condition:
        """Class-balanced labels over this judge's classes (none for an unconditional teacher)."""
        from onestep.eval.sampling import balanced_labels

        if self.num_classes is None:
            return Condition()
        return Condition(class_labels=torch.as_tensor(self.classes)[balanced_labels(n, len(self.classes))].to(device))

    def score(self, images: torch.Tensor) -> dict:
        """FD (and its protocol) of images in [-1, 1]."""
        from onestep.eval.fd import frechet_distance
        from onestep.eval.quantize import to_uint8

        return frechet_distance(to_uint8(images), reference=self.reference, features=self.features).to_dict()

    def _generator(self, device) -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed)

    @torch.no_grad()
    def teacher_samples(self, teacher: Teacher, steps: int, n: int, sampler: str = "ddim",
                        guidance_scale: float | None = None) -> torch.Tensor:
        condition = self.condition(n, teacher.device)
        latents = sample_teacher(teacher, condition, n, steps, sampler, guidance_scale,
                                 generator=self._generator(teacher.device), batch_size=self.batch_size)
        return teacher.decode(latents).clamp(-1, 1)

    def teacher_metrics(self, teacher: Teacher, steps: list[int], sampler: str = "ddim",
                        guidance_scale: float | None = None) -> dict[str, float]:
        out = {}
        for k in steps:
            start = time.perf_counter()
            images = self.teacher_samples(teacher, k, self.num_samples, sampler, guidance_scale)
            elapsed = time.perf_counter() - start
            out[f"{self.metric_name}/teacher_{sampler}{k}"] = self.score(images)["value"]
            out[f"images_per_s/teacher_{sampler}{k}"] = self.num_samples / elapsed
        return {**out, "protocol": self.protocol}

    @torch.no_grad()
    def generator_samples(self, generator, teacher: Teacher, n: int,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] of the (possibly multi-step) generator from this judge's fixed noise.

        `labels` default to this judge's class-balanced ones."""
        rng = self._generator(teacher.device)
        condition = (self.condition(n, teacher.device) if labels is None
                     else Condition(class_labels=labels.to(teacher.device)))
        out = []
        for start in range(0, n, self.batch_size):
            m = min(self.batch_size, n - start)
            noise = torch.randn((m, *teacher.sample_shape), generator=rng, device=teacher.device)
            x0 = generator.sample(noise, condition[start:start + m], generator=rng)
            out.append(teacher.decode(x0).clamp(-1, 1))
        return torch.cat(out)

    def generator_metrics(self, generator, teacher: Teacher) -> dict[str, float]:
        start = time.perf_counter()
        images = self.generator_samples(generator, teacher, self.num_samples)
        elapsed = time.perf_counter() - start
        metrics = {f"{self.metric_name}/student": self.score(images)["value"],
                   "images_per_s/student": self.num_samples / elapsed, "protocol": self.protocol}
        if self.forget_classes:
            metrics.update(self.forgetting_metrics(generator, teacher))
        return metrics

    def forgetting_metrics(self, generator, teacher: Teacher) -> dict[str, float]:
        """SFD's measures: unlearning accuracy per forgotten class, FD on the remaining classes."""
        from onestep.eval.forgetting import forgetting_report
        from onestep.eval.quantize import to_uint8

        def sample(labels: torch.Tensor) -> torch.Tensor:
            return to_uint8(self.generator_samples(generator, teacher, len(labels), labels))

        return forgetting_report(sample, self.num_classes, self.forget_classes, self.num_samples, self.features,
                                 self.reference, self.metric_name)

    def grid_condition(self, per_class: int, device) -> tuple[int, Condition]:
        """One row per class (labels 0,0,..,1,1,..) for sample grids."""
        if self.num_classes is None:
            return per_class * per_class, Condition()
        labels = torch.as_tensor(self.classes, device=device).repeat_interleave(per_class)
        return labels.numel(), Condition(class_labels=labels)

    def teacher_grid(self, teacher: Teacher, steps: int = 50, per_class: int = 10) -> torch.Tensor:
        from onestep.eval.quantize import to_uint8

        n, condition = self.grid_condition(per_class, teacher.device)
        latents = sample_teacher(teacher, condition, n, steps, generator=self._generator(teacher.device))
        return to_uint8(teacher.decode(latents).clamp(-1, 1))

    @torch.no_grad()
    def generator_grid(self, generator, teacher: Teacher, per_class: int = 10) -> torch.Tensor:
        from onestep.eval.quantize import to_uint8

        rng = self._generator(teacher.device)
        n, condition = self.grid_condition(per_class, teacher.device)
        noise = torch.randn((n, *teacher.sample_shape), generator=rng, device=teacher.device)
        return to_uint8(teacher.decode(generator.sample(noise, condition, generator=rng)).clamp(-1, 1))
