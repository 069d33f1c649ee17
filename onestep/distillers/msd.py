"""Multi-Student Distillation (Song et al. 2024/25): K one-step students, each owning one slice of the conditions.

Algorithm, per student k (the students are independent, so they train one after another or on separate machines):
  slice_k = { c : router(c) = k }                  (consecutive class ranges, a user mapping, or text PCA)
  stage 1: DMD2 on the student's own slice         (paired regression, if on, draws pairs from ALL slices)
  stage 2: + the GAN term, real images filtered to slice_k
  smaller students: a channel-reduced UNet, initialised by teacher score matching (`tsm`) rather than at random.
The teacher is shared; each student has its own fake score (a teacher copy) and GAN head. The fitted router is
saved with the students and routes identically at inference (`MultiStudentPipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.data.conditions import ConditionSampler
from onestep.distillers.base import class_conditions
from onestep.distillers.dmd import DMD, DMDOptions
from onestep.models.generator import Generator
from onestep.models.routing import ClassMappingRouter, ClassRangeRouter, Router, TextPCARouter, pool


PARTITIONS = ("ranges", "mapping", "text_pca")


@dataclass
class MSDOptions(DMDOptions):
    """`options:` of an msd config: DMD2's options plus the partition and the student this run trains."""

    num_students: int = 4  # K students, each on its slice of the conditions
    partition: str = "ranges"  # ranges (k = label * K // num_classes) | mapping | text_pca
    mapping: list[int] | None = None  # partition mapping: the student of each class, in class order
    student: int | None = None  # the student to train; None: `onestep train` trains all, one after another
    student_channels: list[int] | None = None  # smaller students from scratch: a channel-reduced teacher copy
    student_init: str | None = None  # smaller students via TSM: a `tsm` run's exported folder (its unet/)

    def validate(self) -> None:
        super().validate()
        if self.num_students < 1:
            raise ValueError(f"num_students must be >= 1, got {self.num_students}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.partition == "mapping" and not self.mapping:
            raise ValueError("partition mapping needs `mapping` (the student of each class)")
        if self.student is not None and not 0 <= self.student < self.num_students:
            raise ValueError(f"student must be in 0..{self.num_students - 1}, got {self.student}")
        if self.student_channels and self.student_init:
            raise ValueError("give student_channels (random init) or student_init (TSM weights), not both")
        if self.student_channels and self.lora.enabled:
            raise ValueError("lora adapts trained weights; a student_channels student starts from random ones")
        if self.generator_input != "sigma":
            raise ValueError("generator_input must be sigma: the MultiStudentPipeline feeds its students sigma_t0 z")
        if self.lora.enabled and self.lora.export == "adapter":
            raise ValueError("lora.export must be merge: the students are assembled into one MultiStudentPipeline")


def pooled_prompts(conditions: ConditionSampler, batch_size: int = 256) -> torch.Tensor:
    """The router's view of every prompt: the token mean of its text embeddings (both encoders' for SDXL), as
    `MultiStudentPipeline` pools them at inference; encoded `batch_size` at a time (a captioned dataset's captions
    are too many for one batch)."""
    prompts = conditions.prompts
    return torch.cat([pool(conditions.encode(prompts[i:i + batch_size]).encoder_hidden_states).cpu()
                      for i in range(0, len(prompts), batch_size)])


def build_router(options: MSDOptions, teacher, conditions: ConditionSampler) -> Router:
    """The partition of the teacher's conditions into `num_students` slices."""
    if options.partition == "text_pca":
        if conditions.prompts is None:
            raise ValueError("partition text_pca needs a text teacher and data.prompts")
        return TextPCARouter.fit(pooled_prompts(conditions), options.num_students)
    if teacher.num_classes is None:
        raise ValueError(f"partition {options.partition} needs a class-conditional teacher")
    if options.partition == "mapping":
        if len(options.mapping) != teacher.num_classes:
            raise ValueError(f"mapping gives a student for {len(options.mapping)} classes but the teacher has "
                             f"{teacher.num_classes}")
        return ClassMappingRouter(options.mapping, options.num_students)
    return ClassRangeRouter(teacher.num_classes, options.num_students)


def student_slice(router: Router, conditions: ConditionSampler, k: int) -> ConditionSampler:
    """The conditions student k owns, as a sampler of their own."""
    if conditions.prompts is not None:
        routed = router.route(prompt_embeds=pooled_prompts(conditions)).tolist()
        return ConditionSampler(prompts=[p for p, s in zip(conditions.prompts, routed, strict=True) if s == k],
                                encode=conditions.encode)
    return ConditionSampler(classes=router.classes_of(k))


class MSD(DMD):
    """One MSD student: DMD2 restricted to the student's slice (the trainer runs one student per run)."""

    options_cls = MSDOptions

    def __init__(self, teacher, options: MSDOptions, conditions: ConditionSampler | None = None, judge=None,
                 batch_size: int = 64, real=None, regression_cache=None):
        if teacher.is_flow and (options.student_channels or options.student_init):
            raise ValueError("smaller MSD students (student_channels, student_init) are UNets; a flow-transformer "
                             "teacher's students are copies of it")
        if options.student is None:
            raise ValueError("an msd run trains one student: set options.student (or train all with `onestep train`)")
        conditions = conditions or class_conditions(teacher)
        self.router = build_router(options, teacher, conditions)
        own = student_slice(self.router, conditions, options.student)
        if own.classes is not None:
            own_classes = own.classes.tolist()
            judge = judge.for_classes(own_classes) if judge is not None else None
            real = real.subset(classes=own_classes) if real is not None else None
        elif real is not None:  # the GAN sees the real images captioned with the student's own prompts
            real = real.subset(prompts=own.prompts)
        # the regression pairs (if any) are built from all conditions: MSD regresses over every slice by design
        super().__init__(teacher, options, conditions, judge, batch_size, real, regression_cache)
        self.conditions = own
        if options.student_channels or options.student_init:
            self.generator = Generator(self._smaller_unet(options), teacher.schedule, options.generator_timesteps)

    def _smaller_unet(self, options: MSDOptions):
        from onestep.models.loading import load_model, resolve_path
        from onestep.models.unet import reduced_unet

        if options.student_init:
            return load_model(resolve_path(options.student_init) / "unet").float().train()
        return reduced_unet(self.teacher.unet, options.student_channels).float().train()
