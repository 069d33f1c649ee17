"""OneStepPipeline's standard diffusers call arguments, each checked against the plain call it stands for."""

import pytest
import torch

from onestep.pipelines import OneStepPipeline
from tests.conftest import scheduler, tiny_clip, tiny_text_unet, tiny_unet, tiny_vae


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory) -> OneStepPipeline:
    encoder, tokenizer = tiny_clip(tmp_path_factory.mktemp("clip"))
    return OneStepPipeline(tiny_text_unet().eval(), scheduler("epsilon", zero_snr=False), vae=tiny_vae().eval(),
                           text_encoder=encoder, tokenizer=tokenizer, timesteps=[999, 500])


def test_num_images_per_prompt_and_prompt_embeds(text_pipe):
    expected = text_pipe(prompt=["cat", "cat", "dog", "dog"], generator=seeded(), output_type="pt").images
    repeated = text_pipe(prompt=["cat", "dog"], num_images_per_prompt=2, generator=seeded(), output_type="pt").images
    embeds, _ = text_pipe.encode_prompt(["cat", "dog"])  # (prompt embeddings, pooled: None without SDXL)
    from_embeds = text_pipe(prompt_embeds=embeds, num_images_per_prompt=2, generator=seeded(), output_type="pt")
    assert expected.shape == (4, 3, 16, 16) and not torch.equal(expected[0], expected[2])
    assert torch.equal(repeated, expected) and torch.equal(from_embeds.images, expected)
    with pytest.raises(ValueError, match="not both"):
        text_pipe(prompt="cat", prompt_embeds=embeds)


def test_latents_are_the_standard_normal_noise(text_pipe):
    z = torch.randn((2, 4, 8, 8), generator=seeded(3))
    # the generator draws z first, then the re-noising noise of the second step
    g = seeded(3)
    torch.randn((2, 4, 8, 8), generator=g)
    drawn = text_pipe(prompt=["cat", "dog"], generator=seeded(3), output_type="pt").images
    given = text_pipe(prompt=["cat", "dog"], latents=z, generator=g, output_type="pt").images
    assert torch.equal(given, drawn)
    with pytest.raises(ValueError, match="latents must have shape"):
        text_pipe(prompt=["cat"], latents=z)


def test_latent_output_is_the_generator_output_before_decoding(text_pipe):
    latents = text_pipe(prompt=["cat"], generator=seeded(), output_type="latent").images
    images = text_pipe(prompt=["cat"], generator=seeded(), output_type="pt").images
    decoded = text_pipe.vae.decode(latents / text_pipe.vae.config.scaling_factor).sample
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == torch.float32
    assert torch.allclose(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_height_and_width(text_pipe):
    latents = text_pipe(prompt=["cat"], height=24, width=32, generator=seeded(), output_type="latent").images
    images = text_pipe(prompt=["cat"], height=24, width=32, generator=seeded(), output_type="np").images
    assert latents.shape == (1, 4, 12, 16) and images.shape == (1, 24, 32, 3)
    with pytest.raises(ValueError, match="multiples of 2"):
        text_pipe(prompt=["cat"], height=15)


def test_callback_on_step_end_sees_and_replaces_each_step(text_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, t, tensors["latents"].clone(), tensors["prompt_embeds"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    images = text_pipe(prompt=["cat"], generator=seeded(), output_type="pt", callback_on_step_end=callback,
                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    first = text_pipe(prompt=["cat"], generator=seeded(), timesteps=[999], output_type="latent").images
    assert [(i, t) for i, t, _, _ in seen] == [(0, 999), (1, 500)] and seen[0][3] == (1, 8, 16)
    assert torch.equal(seen[0][2], first)  # step 0's x0 is the one-step output
    zero = text_pipe.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert torch.allclose(images, (zero / 2 + 0.5).clamp(0, 1), atol=1e-6)  # the callback's x0 was used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        text_pipe(prompt=["cat"], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_class_labels_repeat_per_image():
    pipe = OneStepPipeline(tiny_unet(num_classes=3).eval(), scheduler())
    expected = pipe(class_labels=[0, 0, 2, 2], generator=seeded(), output_type="pt").images
    assert torch.equal(pipe(class_labels=[0, 2], num_images_per_prompt=2, generator=seeded(),
                            output_type="pt").images, expected)


# --- MultiStudentPipeline takes the same arguments (no per-step callback: each student runs its own requests) --------
def test_multi_student_call_arguments(tmp_path):
    from onestep.models.routing import ClassRangeRouter, TextPCARouter, pool
    from onestep.pipelines import MultiStudentPipeline

    sched = scheduler(zero_snr=False)
    unets = [tiny_unet(num_classes=4, seed=k).eval() for k in range(2)]
    pipe = MultiStudentPipeline.from_students(unets, sched, router=ClassRangeRouter(4, 2).to_config(),
                                              timesteps=[999, 500])
    expected = pipe(class_labels=[3, 3, 0, 0], generator=seeded(3), output_type="pt").images
    assert torch.equal(pipe(class_labels=[3, 0], num_images_per_prompt=2, generator=seeded(3),
                            output_type="pt").images, expected)
    g = seeded(3)
    z = torch.randn((4, 1, 8, 8), generator=g)  # the first step's noise; g goes on to draw the second's
    latent = pipe(class_labels=[3, 3, 0, 0], latents=z, generator=g, output_type="latent").images
    assert torch.equal((latent / 2 + 0.5).clamp(0, 1), expected)

    encoder, tokenizer = tiny_clip(tmp_path)
    prompts = ["cat", "dog", "ab cat", "zz dog"]
    embeds = encoder(tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt").input_ids)[0]
    router = TextPCARouter.fit(pool(embeds), 2).to_config()
    text = MultiStudentPipeline.from_students([tiny_text_unet(seed=k).eval() for k in range(2)],
                                              scheduler("epsilon", zero_snr=False), text_encoder=encoder,
                                              tokenizer=tokenizer, router=router)
    from_prompt = text(prompt=prompts, generator=seeded(), output_type="latent").images
    from_embeds = text(prompt_embeds=text.encode_prompt(prompts)[0], generator=seeded(), output_type="latent").images
    assert torch.equal(from_embeds, from_prompt)
