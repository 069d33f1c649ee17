"""SD3- and FLUX-shaped teachers load through diffusers' classes and condition, denoise and sample as their
pipelines do (tiny random folders, tests/conftest.py)."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from onestep.errors import UserInputError
from onestep.models.schedules import FlowSchedule
from onestep.models.teacher import Teacher
from onestep.sampling.teacher import sample_teacher


PROMPTS = ["a cat", "dog", ""]


def test_sd3_prompt_condition_equals_encode_prompt(sd3_dir):
    teacher = Teacher.from_pretrained(sd3_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    condition = teacher.encode_prompts(PROMPTS)
    assert isinstance(teacher.schedule, FlowSchedule) and not teacher.embedded_guidance
    # T5's states agree to float32 rounding (the teacher encodes under no_grad, which takes another attention kernel)
    assert torch.allclose(condition.encoder_hidden_states, embeds, atol=1e-6, rtol=0)
    assert torch.equal(condition.text_embeds, pooled)
    assert condition.txt_ids is None and condition.guidance is None


def test_sd3_without_t5_pads_with_zeros(tmp_path, sd3_dir):
    folder = tmp_path / "no_t5"
    shutil.copytree(sd3_dir, folder)
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    teacher = Teacher.from_pretrained(folder)
    assert teacher.text_encoder_3 is None
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert embeds.shape[1] == pipe.tokenizer_max_length + 256  # CLIP's tokens, then zeros in T5's 256
    condition = teacher.encode_prompts(PROMPTS)
    assert torch.equal(condition.encoder_hidden_states, embeds) and torch.equal(condition.text_embeds, pooled)


def test_flux_prompt_condition_equals_encode_prompt(flux_dir):
    teacher = Teacher.from_pretrained(flux_dir, guidance_scale=3.5)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
    condition = teacher.encode_prompts(PROMPTS)
    assert teacher.embedded_guidance
    assert torch.allclose(condition.encoder_hidden_states, embeds, atol=1e-6, rtol=0)
    assert torch.equal(condition.text_embeds, pooled)
    assert torch.equal(condition.txt_ids, text_ids.expand(3, *text_ids.shape))
    assert torch.equal(condition.guidance, torch.full((3,), 3.5))
    # FLUX's dynamic shift at the teacher's own resolution: 8x8 latents, 16 tokens
    assert torch.equal(teacher.schedule.sigmas, FlowSchedule.from_scheduler(pipe.scheduler, 16).sigmas)


def test_vae_shift_and_scaling_factor_are_applied(sd3_dir):
    teacher = Teacher.from_pretrained(sd3_dir)
    cfg = teacher.vae.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1
    latents = torch.randn(1, *teacher.sample_shape)
    expected = teacher.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
    assert torch.allclose(teacher.decode(latents), expected, atol=1e-6)
    moments = torch.randn(1, 2 * teacher.sample_shape[0], *teacher.sample_shape[1:])
    torch.manual_seed(0)
    drawn = teacher.sample_latents(moments)
    torch.manual_seed(0)
    mean, logvar = moments.chunk(2, dim=1)
    raw = mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn(mean.shape)
    assert torch.allclose(drawn, (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sd3_teacher_sampler_equals_the_pipeline(sd3_dir, guidance):
    """The Euler ODE over the teacher's x0 read-out (with true CFG at 2) lands on StableDiffusion3Pipeline's
    latents: schedule, time input, velocity read-out and prompt encoding all agree. The sampler takes FLUX's
    default sigmas linspace(1, 1/N, N), shifted (SD3's pipeline by default spaces them to its shifted sigma_min)."""
    teacher = Teacher.from_pretrained(sd3_dir, guidance_scale=guidance)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=guidance, latents=z.clone(), height=16,
                    width=16, output_type="latent", max_sequence_length=16, sigmas=[1.0, 0.75, 0.5, 0.25]).images
    ours = sample_teacher(teacher, teacher.encode_prompts(PROMPTS[:2]), 2, 4, noise=z)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_flux_teacher_sampler_equals_the_pipeline(flux_dir):
    """FLUX.1-dev: embedded guidance through `guidance`, packed latents and image ids, dynamic shift."""
    teacher = Teacher.from_pretrained(flux_dir, guidance_scale=3.5)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(z, 2, *teacher.sample_shape)
    out = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=3.5, latents=packed, height=16, width=16,
               output_type="latent", max_sequence_length=16).images
    expected = FluxPipeline._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    ours = sample_teacher(teacher, teacher.encode_prompts(PROMPTS[:2]), 2, 4, noise=z)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_other_transformer_pipelines_are_refused(tmp_path, flux_dir):
    folder = tmp_path / "sana"
    shutil.copytree(flux_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "SanaPipeline"}))
    with pytest.raises(UserInputError, match="SanaPipeline is not supported"):
        Teacher.from_pretrained(folder)
