"""Sampling from what users have on disk: an exported one-step pipeline, or a teacher folder with K steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from onestep.errors import UserInputError
from onestep.files import read_json
from onestep.models.loading import dtype_kwargs, resolve_model


@dataclass
class FolderSampler:
    """Draws images in [-1, 1] for given class labels (or none) from a pipeline or teacher folder."""

    path: Path
    kind: str  # "onestep" | "stock" (a one-step student as a stock diffusers folder) | "teacher"
    num_classes: int | None
    nfe: int  # network evaluations per image (guidance doubles a teacher step)
    _pipe: object = None
    _teacher: object = None
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float | None = None

    is_text: bool = False  # text-to-image: sample() needs prompts

    def check_prompts(self, prompts: list[str] | None) -> None:
        """Prompts for a text-to-image folder, none otherwise (UserInputError naming the folder)."""
        if self.is_text and not prompts:
            raise UserInputError(f"{self.path} is text-to-image: pass --prompts FILE (one prompt per line)")
        if prompts and not self.is_text:
            raise UserInputError(f"{self.path} does not take prompts (it is "
                                 f"{'class-conditional' if self.num_classes else 'unconditional'}); drop --prompts")

    def batches(self, labels: torch.Tensor | None, num_images: int, seed: int, batch_size: int = 256,
                prompts: list[str] | None = None):
        """(images in [-1, 1], labels, prompts) batch by batch, one image per label / prompt, from noise `seed`."""
        self.check_prompts(prompts)
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            batch_labels = labels[start:start + n] if labels is not None else None
            batch_prompts = prompts[start:start + n] if prompts else None
            with torch.no_grad():
                yield self._draw(n, batch_labels, batch_prompts, generator), batch_labels, batch_prompts

    def _draw(self, n: int, labels: torch.Tensor | None, prompts: list[str] | None,
              generator: torch.Generator) -> torch.Tensor:
        if self.kind == "onestep":
            kwargs = {"class_labels": labels} if labels is not None else {"batch_size": n}
            if prompts is not None:
                kwargs = {"prompt": prompts}
            images = self._pipe(**kwargs, generator=generator, output_type="pt").images
            return images.float() * 2 - 1
        if self.kind == "stock":  # its scheduler's one step is the student (onestep.export.stock)
            images = self._pipe(prompt=prompts, num_inference_steps=1, guidance_scale=0.0, generator=generator,
                                output_type="pt").images
            return images.float() * 2 - 1
        from onestep.sampling.teacher import sample_teacher

        condition = self._teacher.condition(class_labels=labels, prompts=prompts)
        latents = sample_teacher(self._teacher, condition, n, self.steps, self.sampler, self.guidance_scale,
                                 generator=generator, batch_size=n)
        return self._teacher.decode(latents).clamp(-1, 1)

    def sample(self, labels: torch.Tensor | None, num_images: int, seed: int, batch_size: int = 256,
               prompts: list[str] | None = None) -> torch.Tensor:
        """Images in [-1, 1]: one per label (class-conditional), per prompt (text-to-image) or num_images."""
        return torch.cat([images for images, _, _ in self.batches(labels, num_images, seed, batch_size, prompts)])


def load_sampler(path: str | Path, steps: int = 50, sampler: str = "ddim",
                 guidance_scale: float | None = None) -> FolderSampler:
    """Open an exported OneStepPipeline folder, its stock diffusers copy (`pipeline_diffusers/`, sampled in its one
    step) or a teacher folder (diffusers layout; or a Hub id in the local Hugging Face cache) for sampling."""
    path = resolve_model(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserInputError(f"{path} is not a pipeline or teacher folder (no model_index.json)")
    class_name = read_json(index_file).get("_class_name")
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
            from onestep.models.lora import merged_folder_adapter

            pipe.register_modules(unet=merged_folder_adapter(pipe.unet, path))
        return FolderSampler(path, "onestep", pipe.config.num_classes, len(pipe.config.timesteps), _pipe=pipe,
                             is_text=getattr(pipe, "text_encoder", None) is not None)
    from onestep.export.stock import is_one_step_stock

    if is_one_step_stock(path):
        return _stock_sampler(path)
    from onestep.models.teacher import Teacher

    teacher = Teacher.from_pretrained(path)
    scale = teacher.guidance_scale if guidance_scale is None else guidance_scale
    guided = scale != 1.0 and (teacher.num_classes or teacher.is_text) and not teacher.embedded_guidance
    nfe = steps * (2 if guided else 1)  # FLUX.1-dev's embedded guidance costs no second pass
    return FolderSampler(path, "teacher", teacher.num_classes, nfe, _teacher=teacher, steps=steps, sampler=sampler,
                         guidance_scale=guidance_scale, is_text=teacher.is_text)


def _stock_sampler(path: Path) -> FolderSampler:
    """A one-step student's stock StableDiffusion(XL)Pipeline folder, in float32 (its one step: nfe 1)."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, **dtype_kwargs(torch.float32))
    except Exception as err:  # diffusers raises many types for corrupt folders
        raise UserInputError(f"cannot load pipeline {path}: {str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return FolderSampler(path, "stock", None, 1, _pipe=pipe, is_text=True)
