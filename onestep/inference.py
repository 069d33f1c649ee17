"""Sampling from what users have on disk: an exported one-step pipeline, or a teacher folder with K steps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from onestep.errors import UserInputError
from onestep.loading import dtype_kwargs, resolve_path


@dataclass
class FolderSampler:
    """Draws images in [-1, 1] for given class labels (or none) from a pipeline or teacher folder."""

    path: Path
    kind: str  # "onestep" | "teacher"
    num_classes: int | None
    nfe: int  # network evaluations per image (guidance doubles a teacher step)
    _pipe: object = None
    _teacher: object = None
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float | None = None

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | None, num_images: int, seed: int, batch_size: int = 256) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            batch_labels = labels[start:start + n] if labels is not None else None
            if self.kind == "onestep":
                kwargs = {"class_labels": batch_labels} if batch_labels is not None else {"batch_size": n}
                images = self._pipe(**kwargs, generator=generator, output_type="pt").images
                out.append(images.float() * 2 - 1)
            else:
                from onestep.sampling import sample_teacher

                condition = self._teacher.condition(class_labels=batch_labels)
                latents = sample_teacher(self._teacher, condition, n, self.steps, self.sampler, self.guidance_scale,
                                         generator=generator, batch_size=n)
                out.append(self._teacher.decode(latents).clamp(-1, 1))
        return torch.cat(out)


def load_sampler(path: str | Path, steps: int = 50, sampler: str = "ddim",
                 guidance_scale: float | None = None) -> FolderSampler:
    """Open an exported OneStepPipeline folder or a teacher folder (diffusers layout) for sampling."""
    path = resolve_path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserInputError(f"{path} is not a pipeline or teacher folder (no model_index.json)")
    try:
        class_name = json.loads(index_file.read_text()).get("_class_name")
    except json.JSONDecodeError:
        raise UserInputError(f"corrupt {index_file}") from None
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name in ("OneStepPipeline", "MultiStudentPipeline"):
        from diffusers.utils import logging as diffusers_logging

        from onestep import pipelines

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" would clutter CLI output

        try:
            pipe = getattr(pipelines, class_name).from_pretrained(path, **dtype_kwargs(torch.float32))
        except Exception as err:  # diffusers raises many types for corrupt folders
            raise UserInputError(f"cannot load pipeline {path}: {str(err).splitlines()[0]}") from None
        pipe.set_progress_bar_config(disable=True)
        if class_name == "OneStepPipeline":
            from onestep.lora import merged_folder_adapter

            pipe.register_modules(unet=merged_folder_adapter(pipe.unet, path))
        return FolderSampler(path, "onestep", pipe.config.num_classes, len(pipe.config.timesteps), _pipe=pipe)
    from onestep.teacher import Teacher

    teacher = Teacher.from_pretrained(path)
    scale = teacher.guidance_scale if guidance_scale is None else guidance_scale
    nfe = steps * (2 if scale != 1.0 and teacher.num_classes else 1)
    return FolderSampler(path, "teacher", teacher.num_classes, nfe, _teacher=teacher, steps=steps, sampler=sampler,
                         guidance_scale=guidance_scale)
