"""Flow students export as OneStepPipeline folders and as stock StableDiffusion3Pipeline / FluxPipeline folders whose
one FlowMatchEuler step from t = 1 (x0 = z - v) gives the same images."""

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from onestep.export.pipeline import export_generator
from onestep.export.stock import stock_folder
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.pipelines import OneStepPipeline


PROMPTS = ["a cat", "dog"]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturbed_generator(teacher: Teacher, timesteps=(999,)) -> Generator:
    """A student that is not the teacher (so equality cannot come from copying the teacher's weights)."""
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps).eval()
    with torch.no_grad():
        for p in generator.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=seeded(1)))
    return generator


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@torch.no_grad()
def test_stock_flow_pipeline_equals_the_student(tmp_path, sd3_dir, flux_dir, kind):
    teacher = Teacher.from_pretrained(sd3_dir if kind == "sd3" else flux_dir, guidance_scale=4.0)
    generator = perturbed_generator(teacher)
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    student = OneStepPipeline.from_pretrained(folder)
    z = torch.randn(2, *teacher.sample_shape, generator=seeded())
    # the exported student is the trained generator: same latents from the same noise and prompts
    latents = student(prompt=PROMPTS, latents=z, output_type="latent").images
    assert torch.allclose(latents, generator(z, teacher.encode_prompts(PROMPTS)), atol=1e-6)

    assert_stock_equals_student(folder, student, kind)


def assert_stock_equals_student(folder, student: OneStepPipeline, kind: str = "sd3", prompts=PROMPTS) -> None:
    """The exported folder's stock diffusers twin (pipeline_diffusers/, no custom code) gives the student's images
    from the same seed: one FlowMatchEuler step from sigma 1 to 0."""
    stock_dir = stock_folder(folder)
    assert (stock_dir / "model_index.json").is_file() and not list(stock_dir.rglob("*.py"))
    stock = DiffusionPipeline.from_pretrained(stock_dir)
    assert type(stock.scheduler) is FlowMatchEulerDiscreteScheduler
    expected = student(prompt=prompts, generator=seeded(), output_type="pt").images
    if kind == "sd3":
        assert type(stock) is StableDiffusion3Pipeline
        images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, generator=seeded(), output_type="pt",
                       max_sequence_length=16).images
    else:
        assert type(stock) is FluxPipeline
        images = stock(prompts, num_inference_steps=1, guidance_scale=4.0, generator=seeded(), output_type="pt",
                       max_sequence_length=16, height=16, width=16).images
    assert stock.scheduler.sigmas.tolist() == [1.0, 0.0]
    assert images.shape == expected.shape
    assert torch.allclose(images, expected, atol=1e-5), (images - expected).abs().max()


@torch.no_grad()
def test_few_step_flow_student_has_no_stock_folder_but_samples(tmp_path, sd3_dir):
    teacher = Teacher.from_pretrained(sd3_dir)
    generator = perturbed_generator(teacher, (999, 499))
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    assert not stock_folder(folder).exists()
    student = OneStepPipeline.from_pretrained(folder)
    z = torch.randn(1, *teacher.sample_shape, generator=seeded())
    # the recursion: x0 at t=1, re-noised onto s_499 with fresh noise, read out again
    latents = student(prompt=PROMPTS[:1], latents=z, generator=seeded(5), output_type="latent").images
    condition = teacher.encode_prompts(PROMPTS[:1])
    x0 = generator(z, condition)
    expected = generator(z, condition, 1, generator.renoise(x0, 1, seeded(5)))
    assert torch.allclose(latents, expected, atol=1e-5)
