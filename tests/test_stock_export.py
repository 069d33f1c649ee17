"""SD-family one-step students as stock diffusers pipelines: one scheduler step reproduces the OneStepPipeline."""

import json
import os

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from onestep.export.pipeline import export_generator, export_pipeline
from onestep.export.stock import export_stock_pipeline, stock_folder
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.pipelines import OneStepPipeline
from tests.conftest import scheduler, sd_folder, tiny_clip, tiny_text_unet, tiny_unet, tiny_vae


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def text_teacher(clip, kind: str, zero_snr: bool) -> Teacher:
    encoder, tokenizer = clip
    return Teacher(tiny_text_unet().eval(), scheduler(kind, zero_snr=zero_snr), vae=tiny_vae().eval(),
                   text_encoder=encoder, tokenizer=tokenizer)


def trained_generator(teacher: Teacher, t0: int, input_scaling: str) -> Generator:
    """A generator whose weights moved off the teacher's (as training would move them)."""
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(t0,), input_scaling=input_scaling)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return generator.eval()


# SD1.5's case (epsilon, t0 = T-1), a zero-terminal-SNR v-prediction teacher at T-1, and a read-out at t0 = 399; each
# with the generator fed sigma_t0 z ("sigma") or z itself ("unit": DMD2's SDXL one-step student)
@pytest.mark.parametrize("input_scaling", ["sigma", "unit"])
@pytest.mark.parametrize(("kind", "zero_snr", "t0", "stock_scheduler"),
                         [("epsilon", False, 999, EulerDiscreteScheduler), ("v_prediction", True, 999, LCMScheduler),
                          ("epsilon", False, 399, EulerDiscreteScheduler)])
@torch.no_grad()
def test_stock_pipeline_one_step_equals_the_student(tmp_path, clip, kind, zero_snr, t0, stock_scheduler,
                                                    input_scaling):
    teacher = text_teacher(clip, kind, zero_snr)
    generator = trained_generator(teacher, t0, input_scaling)
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    stock_dir = tmp_path / "pipeline_diffusers"
    assert stock_folder(folder) == stock_dir and (stock_dir / "model_index.json").is_file()
    assert not list(stock_dir.rglob("*.py"))  # no custom code travels with it

    student = OneStepPipeline.from_pretrained(folder)
    stock = DiffusionPipeline.from_pretrained(stock_dir)  # plain diffusers resolves the class from model_index.json
    assert type(stock) is StableDiffusionPipeline and type(stock.scheduler) is stock_scheduler
    prompts = ["cat", "dog"]
    expected = student(prompt=prompts, generator=seeded(), output_type="pt").images
    images = stock(prompts, num_inference_steps=1, guidance_scale=0.0, generator=seeded(), output_type="pt").images
    assert stock.scheduler.timesteps.tolist() == [t0]
    assert torch.allclose(images, expected, atol=1e-5)

    z = torch.randn((2, 4, 8, 8), generator=seeded(7))  # the same noise handed to both as `latents`
    x0 = student(prompt=prompts, latents=z, output_type="latent").images
    stock_x0 = stock(prompts, num_inference_steps=1, guidance_scale=0.0, latents=z, output_type="latent").images
    assert torch.allclose(stock_x0, x0, rtol=1e-5, atol=1e-5 * x0.abs().max().item())
    # both are the generator as it trained: its own sample of z, and not that of the other input convention
    trained = generator(z, teacher.condition(prompts=prompts))
    assert torch.allclose(x0, trained, rtol=1e-5, atol=1e-5 * x0.abs().max().item())
    if kind == "epsilon":  # (a zero-terminal-SNR T-1 has sigma_t0 = 1: there the two conventions coincide)
        generator.input_scaling = {"sigma": "unit", "unit": "sigma"}[input_scaling]
        assert not torch.allclose(generator(z, teacher.condition(prompts=prompts)), trained, atol=1e-3)
    # the stock folder shares the exported weights
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert os.path.samefile(folder / weights, stock_dir / weights) or \
        (folder / weights).read_bytes() == (stock_dir / weights).read_bytes()


# teachers as diffusers folders: SD1.5-shaped (scaled_linear epsilon, PNDM) and SDXL-shaped (two text encoders, pooled
# embedding and time ids; DMD2's one-step SDXL reads out at 399), at the default and at another image size
# (a bfloat16 teacher leaves its VAE and text encoders in bfloat16 beside the float32 generator: the stock folder holds
# float32 copies, and equals the student loaded in float32)
@pytest.mark.parametrize(("kind", "t0", "stock_cls", "dtype", "input_scaling"),
                         [("sd15", 999, StableDiffusionPipeline, torch.float32, "sigma"),
                          ("sdxl", 399, StableDiffusionXLPipeline, torch.bfloat16, "sigma"),
                          ("sdxl", 399, StableDiffusionXLPipeline, torch.bfloat16, "unit")])
@torch.no_grad()
def test_stock_export_of_sd_family_teacher_folders(tmp_path, monkeypatch, kind, t0, stock_cls, dtype, input_scaling):
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl

    teacher = Teacher.from_pretrained(sd_folder(tmp_path / kind, kind), dtype=dtype)
    generator = trained_generator(teacher, t0, input_scaling)
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    student = OneStepPipeline.from_pretrained(folder, dtype=torch.float32)
    # SDXL would add an invisible watermark where its package is installed: the folder turns it off
    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    stock = DiffusionPipeline.from_pretrained(stock_folder(folder))
    assert type(stock) is stock_cls and type(stock.scheduler) is EulerDiscreteScheduler
    assert getattr(stock, "watermark", None) is None
    assert all(p.dtype == torch.float32 for name in ("unet", "vae", "text_encoder")
               for p in getattr(stock, name).parameters())
    prompts = ["a cat", "dog"]
    for size in ({}, {"height": 24, "width": 32}):  # SDXL's time ids hold the image size
        expected = student(prompt=prompts, generator=seeded(), output_type="pt", **size).images
        images = stock(prompts, num_inference_steps=1, guidance_scale=0.0, generator=seeded(), output_type="pt",
                       **size).images
        assert stock.scheduler.timesteps.tolist() == [t0]
        assert images.shape == expected.shape and torch.allclose(images, expected, atol=1e-5)


@pytest.mark.parametrize("case", ["class_conditional", "multi_step", "signal"])
def test_no_stock_pipeline_where_a_stock_scheduler_cannot_be_the_student(tmp_path, clip, case):
    if case == "class_conditional":
        pipe = OneStepPipeline(tiny_unet(num_classes=3, channels=4), scheduler(), vae=tiny_vae())
    else:
        encoder, tokenizer = clip
        pipe = OneStepPipeline(tiny_text_unet(), scheduler(), vae=tiny_vae(), text_encoder=encoder,
                               tokenizer=tokenizer, timesteps=[999, 500] if case == "multi_step" else [999],
                               readout="signal" if case == "signal" else "x0")
    folder = export_pipeline(pipe, tmp_path / "pipeline")
    assert export_stock_pipeline(folder) is None and not stock_folder(folder).exists()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "OneStepPipeline"
