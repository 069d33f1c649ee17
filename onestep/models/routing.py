"""Routers for Multi-Student Distillation: which of K one-step students serves a condition.

MSD (Song, Lorraine, Nie, Kreis & Lucas, "Multi-student Diffusion Distillation for Better One-step Generators",
arXiv:2410.23274, 2024; ICML 2025) splits the conditions into K disjoint slices and distills one student per slice,
so each student spends its capacity on fewer conditions. Class-conditional models are split into consecutive class
ranges (`ClassRangeRouter`, or any explicit split with `ClassMappingRouter`); text-conditional models are split by
PCA of the pooled prompt embedding and median thresholds per component (`TextPCARouter`), because k-means gave
slices of uneven size.

Fitting and validation live here; the exported `MultiStudentPipeline` evaluates the stored `to_config()` with its
own copy of the arithmetic (it imports torch and diffusers only), which the tests check routes identically.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from onestep.errors import UserInputError


class Router(abc.ABC):
    """Maps each requested condition to the index of the student that serves it."""

    type: ClassVar[str]
    num_students: int

    @abc.abstractmethod
    def route(self, class_labels: torch.Tensor | None = None,
              prompt_embeds: torch.Tensor | None = None) -> torch.LongTensor:
        """Student index per sample, in [0, num_students)."""

    @abc.abstractmethod
    def to_config(self) -> dict:
        """JSON-serialisable description with a `"type"` key; `router_from_config` rebuilds the same router."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict) -> Router:
        """The router described by `to_config()`."""


# --- class-conditional ----------------------------------------------------------------------------------------------
class ClassRouter(Router):
    """A fixed student per class, kept as a lookup table `student_of[label]`; every student owns >= 1 class."""

    def __init__(self, student_of: torch.Tensor, num_students: int):
        self.student_of = student_of.long()
        self.num_students = num_students

    @property
    def num_classes(self) -> int:
        return self.student_of.numel()

    def classes_of(self, k: int) -> list[int]:
        """The classes student k is trained on and serves (its slice of the condition space)."""
        if not 0 <= k < self.num_students:
            raise UserInputError(f"student index must be in [0, {self.num_students}), got {k}")
        return (self.student_of == k).nonzero().flatten().tolist()

    def route(self, class_labels: torch.Tensor | None = None,
              prompt_embeds: torch.Tensor | None = None) -> torch.LongTensor:
        if class_labels is None:
            raise UserInputError(f"{type(self).__name__} routes by class label; got no class_labels")
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise UserInputError(f"class_labels must be ints in [0, {self.num_classes}), got {labels.tolist()}")
        return self.student_of.to(labels.device)[labels.long()]


class ClassRangeRouter(ClassRouter):
    """Consecutive class ranges, as MSD splits ImageNet: student k = label * K // num_classes.

    Each student gets floor or ceil of num_classes / K classes, so K must not exceed num_classes.
    """

    type = "class_range"

    def __init__(self, num_classes: int, num_students: int):
        if not 1 <= num_students <= num_classes:
            raise UserInputError(f"need 1 <= num_students <= num_classes, got {num_students} students for "
                                 f"{num_classes} classes")
        super().__init__(torch.arange(num_classes) * num_students // num_classes, num_students)

    def to_config(self) -> dict:
        return {"type": self.type, "num_classes": self.num_classes, "num_students": self.num_students}

    @classmethod
    def from_config(cls, config: dict) -> ClassRangeRouter:
        return cls(config["num_classes"], config["num_students"])


class ClassMappingRouter(ClassRouter):
    """An explicit class -> student split chosen by the user (e.g. semantically grouped classes).

    `mapping` is a list (`mapping[label] = student`) or a dict over exactly the labels 0..num_classes-1.
    """

    type = "class_mapping"

    def __init__(self, mapping: Mapping[int, int] | Sequence[int], num_students: int):
        student_of = self.check_mapping(mapping, num_students)
        super().__init__(torch.tensor(student_of, dtype=torch.long), num_students)

    @staticmethod
    def check_mapping(mapping: Mapping[int, int] | Sequence[int], num_students: int) -> list[int]:
        """The mapping as a list indexed by label, checked: every class mapped, every student in range and used."""
        if isinstance(mapping, Mapping):
            labels = sorted(int(c) for c in mapping)
            if labels != list(range(len(labels))):
                raise UserInputError(f"the mapping must cover classes 0..{len(labels) - 1} without gaps, "
                                     f"got classes {labels}")
            mapping = [mapping[c] for c in range(len(labels))]
        student_of = [int(k) for k in mapping]
        if num_students < 1 or not student_of:
            raise UserInputError(f"need at least one class and one student, got {len(student_of)} classes and "
                                 f"{num_students} students")
        out_of_range = sorted({k for k in student_of if not 0 <= k < num_students})
        if out_of_range:
            raise UserInputError(f"student indices must be in [0, {num_students}), got {out_of_range}")
        idle = sorted(set(range(num_students)) - set(student_of))
        if idle:
            raise UserInputError(f"every student needs at least one class; students {idle} have none")
        return student_of

    def to_config(self) -> dict:
        return {"type": self.type, "mapping": self.student_of.tolist(), "num_students": self.num_students}

    @classmethod
    def from_config(cls, config: dict) -> ClassMappingRouter:
        return cls(config["mapping"], config["num_students"])


# --- text-conditional -----------------------------------------------------------------------------------------------
def pool(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(N, D) float64 pooled text embedding: the mean over tokens of (N, L, D) encoder hidden states.

    Training (fitting on the teacher's prompt embeddings) and inference (the pipeline's own text encoder output)
    both pool this way, padding tokens included, so a prompt lands on the same student in both. Already pooled
    (N, D) embeddings pass through.
    """
    if prompt_embeds.ndim == 3:
        return prompt_embeds.double().mean(dim=1)
    if prompt_embeds.ndim == 2:
        return prompt_embeds.double()
    raise UserInputError(f"prompt embeddings must be (N, L, D) or pooled (N, D), got {tuple(prompt_embeds.shape)}")


class TextPCARouter(Router):
    """Text split by the signs of log2(K) principal components of the pooled prompt embedding about their medians.

    Student index = sum_b bit_b 2^b with bit_b = (projection on component b > median_b). Median thresholds halve
    the fitting prompts exactly along every component, where k-means gave slices of uneven size. `mean`,
    `components` (B, D) and `thresholds` (B,) are float64; B = log2(K).
    """

    type = "text_pca"

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, thresholds: torch.Tensor):
        self.mean = mean.double()
        self.components = components.double().reshape(len(thresholds), len(mean))
        self.thresholds = thresholds.double()
        self.num_students = 2 ** len(thresholds)

    @classmethod
    def fit(cls, pooled: torch.Tensor, num_students: int) -> TextPCARouter:
        """Fit on pooled prompt embeddings (N, D) (see `pool`); K = num_students must be a power of 2."""
        bits = max(num_students, 1).bit_length() - 1
        if num_students < 1 or 2 ** bits != num_students:
            raise UserInputError(f"TextPCARouter needs a power-of-2 number of students, got {num_students}")
        if pooled.ndim != 2 or bits > min(pooled.shape):
            raise UserInputError(f"need pooled embeddings (N, D) with N, D >= {bits} for {num_students} students, "
                                 f"got shape {tuple(pooled.shape)}")
        x = pooled.double()
        mean = x.mean(dim=0)
        components = torch.linalg.svd(x - mean, full_matrices=False).Vh[:bits]
        thresholds = ((x - mean) @ components.T).median(dim=0).values
        return cls(mean, components, thresholds)

    def route(self, class_labels: torch.Tensor | None = None,
              prompt_embeds: torch.Tensor | None = None) -> torch.LongTensor:
        if prompt_embeds is None:
            raise UserInputError("TextPCARouter routes by prompt; got no prompt_embeds")
        pooled = pool(prompt_embeds)
        mean, components, thresholds = (v.to(pooled.device) for v in (self.mean, self.components, self.thresholds))
        above = ((pooled - mean) @ components.T) > thresholds
        return (above.long() * 2 ** torch.arange(above.shape[1], device=pooled.device)).sum(dim=1)

    def to_config(self) -> dict:
        """Plain floats (JSON writes float64 exactly, shortest round-trip repr)."""
        return {"type": self.type, "num_students": self.num_students, "mean": self.mean.tolist(),
                "components": self.components.tolist(), "thresholds": self.thresholds.tolist()}

    @classmethod
    def from_config(cls, config: dict) -> TextPCARouter:
        router = cls(*(torch.tensor(config[k], dtype=torch.float64) for k in ("mean", "components", "thresholds")))
        if router.num_students != config["num_students"]:
            raise UserInputError(f"text_pca router config: {len(config['thresholds'])} thresholds cannot route "
                                 f"{config['num_students']} students")
        return router


ROUTERS: dict[str, type[Router]] = {cls.type: cls for cls in (ClassRangeRouter, ClassMappingRouter, TextPCARouter)}


def router_from_config(config: dict) -> Router:
    """The router saved by `Router.to_config()` (e.g. read back from an exported pipeline's model_index.json)."""
    kind = config.get("type")
    if kind not in ROUTERS:
        raise UserInputError(f"unknown router type {kind!r}; known: {sorted(ROUTERS)}")
    return ROUTERS[kind].from_config(config)
