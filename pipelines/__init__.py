"""Self-contained diffusers pipelines (torch + diffusers only), copied into every exported folder."""

from .pipeline_class_conditional import ClassConditionalDiffusionPipeline
from .pipeline_multi_student import MultiStudentPipeline
from .pipeline_onestep import OneStepPipeline


__all__ = ["ClassConditionalDiffusionPipeline", "MultiStudentPipeline", "OneStepPipeline"]
