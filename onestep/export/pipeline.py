"""Write pipelines as self-contained diffusers folders (safetensors + the pipeline's own source file), atomically.

An exported `OneStepPipeline` folder loads three ways (no network needed, HF_HUB_OFFLINE=1 is fine):

    from onestep.pipelines import OneStepPipeline
    pipe = OneStepPipeline.from_pretrained(folder)                         # (a) with onestep installed

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_onestep",
                                             trust_remote_code=True)      # (b) plain diffusers, no onestep

    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")           # (c) the generator alone

In (b), `custom_pipeline` names the `.py` file inside the folder (its path, `f"{folder}/pipeline_onestep.py"`, works
too); diffusers >= 0.38 needs `trust_remote_code=True` even for local files. `model_index.json` keeps the plain
`"_class_name": "OneStepPipeline"`: the list form `["pipeline_onestep", "OneStepPipeline"]` would let (b) drop
`custom_pipeline`, but diffusers then routes every `from_pretrained` through the folder's file, so (a) would demand
`trust_remote_code=True` and return a dynamically imported copy of the class instead of onestep's.

An exported `MultiStudentPipeline` folder (`export_students`) loads the same three ways, with
`custom_pipeline="pipeline_multi_student"` in (b) and `subfolder="unet_k"` for student k in (c).
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torch import nn

from onestep.export.frozen import use_original_components
from onestep.files import atomic_folder
from onestep.models.generator import Generator
from onestep.models.lora import lora_layers, save_lora_weights, without_adapters
from onestep.models.routing import Router
from onestep.models.teacher import Teacher
from onestep.pipelines.pipeline_multi_student import MultiStudentPipeline
from onestep.pipelines.pipeline_onestep import OneStepPipeline


def export_pipeline(pipeline: DiffusionPipeline, out_dir: str | os.PathLike,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """`save_pretrained` (safetensors): onestep's pipelines write their own source file beside `model_index.json`
    (e.g. `pipeline_onestep.py`), which plain diffusers loads with
    `DiffusionPipeline.from_pretrained(out_dir, custom_pipeline="pipeline_onestep", trust_remote_code=True)`.
    `write_extra(folder)` adds files of its own (a LoRA adapter). The folder is written atomically (see
    `atomic_folder`); returns `out_dir`.
    """
    with atomic_folder(out_dir) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if write_extra is not None:
            write_extra(tmp)
    return Path(out_dir)


def export_generator(generator: Generator, teacher: Teacher, out_dir: str | os.PathLike,
                     readout: str = "x0", lora: str = "merge") -> Path:
    """A trained generator as an `OneStepPipeline` folder: its UNet and read-out timesteps, the teacher's scheduler,
    VAE (latent models), text encoder(s) and tokenizer(s) (text-to-image models; the teacher folder's own files, see
    onestep.export.frozen) and classes.

    `readout="signal"` exports a BOOT student (any module with `.unet` and `.timesteps`; see `OneStepPipeline`).
    A LoRA generator's adapters are merged into the exported UNet (`lora="merge"`), or the folder holds the base UNet
    and the adapters beside it in `pytorch_lora_weights.safetensors` (`lora="adapter"`; see onestep.models.lora).

    A one-step text-to-image student of an SD-family teacher is also written as a stock `StableDiffusion(XL)Pipeline`
    folder beside `out_dir` (`out_dir` + "_diffusers"; see onestep.export.stock) and as one original-layout file
    (`out_dir` + ".safetensors"; see onestep.export.single_file)."""
    unet, adapter = generator.unet, None
    if lora_layers(unet):
        unet = without_adapters(generator.unet, merge=lora == "merge")
        adapter = functools.partial(save_lora_weights, generator.unet) if lora == "adapter" else None
    from onestep.export.stock import export_stock_pipeline, stock_folder

    pipeline = OneStepPipeline(unet=unet, scheduler=teacher.scheduler, vae=teacher.vae,
                               text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                               text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2,
                               timesteps=generator.timesteps, num_classes=teacher.num_classes, readout=readout,
                               text_encoder_3=teacher.text_encoder_3, tokenizer_3=teacher.tokenizer_3,
                               embedded_guidance=teacher.guidance_scale if teacher.embedded_guidance else None,
                               input_scaling=getattr(generator, "input_scaling", "sigma"))  # BOOT's has none
    stock_dir = stock_folder(out_dir)
    written = []

    def write_extra(folder: Path) -> None:
        use_original_components(teacher, folder)  # the VAE, text encoders, tokenizers as on the teacher's disk
        if adapter is not None:
            adapter(folder)
        # SD-family and flow one-step students: also OUT_DIR_diffusers, a stock diffusers folder, written from the
        # new folder before either replaces its old one: a failure in either (a full disk) leaves both as they were
        written.append(export_stock_pipeline(folder, stock_dir))

    out_dir = export_pipeline(pipeline, out_dir, write_extra)
    if written[0] is not None and adapter is None and not teacher.is_flow:  # an adapter run's: the base UNet
        from onestep.export.single_file import export_single_file, single_file

        try:  # and OUT_DIR.safetensors (ComfyUI, A1111)
            export_single_file(written[0], single_file(out_dir))
        except (ValueError, KeyError) as err:  # a UNet / VAE with no original-layout equivalent: the rest stands
            warnings.warn(f"no single-file export beside {out_dir}: {err}", stacklevel=2)
    return out_dir


def export_students(unets: Sequence[nn.Module], teacher: Teacher, router: Router, timesteps: Sequence[int],
                    out_dir: str | os.PathLike) -> Path:
    """MSD students as a `MultiStudentPipeline` folder: student k's UNet in `unet_k/`, the router's config and the
    read-out timesteps in `model_index.json`, and the teacher's scheduler, VAE, text encoder, tokenizer and classes.
    """
    pipeline = MultiStudentPipeline.from_students(list(unets), teacher.scheduler, router=router.to_config(),
                                                  vae=teacher.vae, text_encoder=teacher.text_encoder,
                                                  tokenizer=teacher.tokenizer, text_encoder_2=teacher.text_encoder_2,
                                                  tokenizer_2=teacher.tokenizer_2, timesteps=list(timesteps),
                                                  num_classes=teacher.num_classes,
                                                  text_encoder_3=teacher.text_encoder_3,
                                                  tokenizer_3=teacher.tokenizer_3,
                                                  embedded_guidance=teacher.guidance_scale
                                                  if teacher.embedded_guidance else None)
    return export_pipeline(pipeline, out_dir, functools.partial(use_original_components, teacher))


def export_denoiser(unet: nn.Module, scheduler, out_dir: str | os.PathLike,
                    dtype: torch.dtype = torch.float32) -> Path:
    """A (multi-step) denoiser as a teacher-layout `ClassConditionalDiffusionPipeline` folder: a trained teacher, or
    TSM's smaller denoiser. A copy in `dtype` is saved, so the network in training is left as it is."""
    from onestep.pipelines import ClassConditionalDiffusionPipeline

    return export_pipeline(ClassConditionalDiffusionPipeline(unet=copy.deepcopy(unet).to(dtype), scheduler=scheduler),
                           out_dir)

