"""Generator, fake score and GAN heads on flow transformers (tiny SD3 / FLUX folders)."""

import pytest
import torch

from onestep.models.critics import FakeScore, blocks_at_depths, transformer_blocks
from onestep.models.generator import Generator
from onestep.models.lora import LoRAConfig, add_lora, lora_layers
from onestep.models.teacher import Teacher


@pytest.fixture(params=["sd3", "flux"])
def teacher(request, sd3_dir, flux_dir):
    return Teacher.from_pretrained(sd3_dir if request.param == "sd3" else flux_dir, guidance_scale=3.5)


def test_generator_is_the_velocity_read_out_at_t1_from_pure_noise(teacher):
    """G(z) = z - v(z, t = 1): the transformer called at timestep 1000 on the noise itself."""
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, [999])
    condition = teacher.encode_prompts(["a cat", "dog"])
    z = torch.randn(2, *teacher.sample_shape)
    assert torch.equal(generator.input_noise(z), z)
    with torch.no_grad():
        x0 = generator(z, condition)
        net = generator.unet
        if hasattr(net, "single_transformer_blocks"):  # FLUX: pack, timestep / 1000, embedded guidance, unpack
            from diffusers import FluxPipeline

            b, c, h, w = z.shape
            v = net(hidden_states=FluxPipeline._pack_latents(z, b, c, h, w), timestep=torch.ones(2),
                    guidance=condition.guidance, pooled_projections=condition.text_embeds,
                    encoder_hidden_states=condition.encoder_hidden_states, txt_ids=condition.txt_ids[0],
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)).sample
            v = FluxPipeline._unpack_latents(v, h, w, 1)
        else:
            v = net(hidden_states=z, timestep=torch.full((2,), 1000.0), pooled_projections=condition.text_embeds,
                    encoder_hidden_states=condition.encoder_hidden_states).sample
    assert torch.allclose(x0, z - v, atol=1e-6)
    # a few-step generator re-noises onto the shifted grid: x = (1 - s) x0 + s eps
    two = Generator.from_teacher(teacher.unet, teacher.schedule, [999, 499])
    eps_generator = torch.Generator().manual_seed(1)
    x = two.renoise(x0, 1, eps_generator)
    s = teacher.schedule.sigmas[499].float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x, (1 - s) * x0 + s * eps, atol=1e-6)


def test_depths_pick_blocks():
    assert blocks_at_depths(24, [0.5, 0.75, 1.0]) == [11, 17, 23]
    assert blocks_at_depths(2, [0.5, 0.75, 1.0]) == [0, 1]
    with pytest.raises(ValueError, match="gan_depths"):
        blocks_at_depths(4, [0.0])


@pytest.mark.parametrize("head", ["bottleneck", "mean"])
def test_gan_head_reads_chosen_depths_and_stops_there(teacher, head):
    fake = FakeScore.from_teacher(teacher.unet, teacher.schedule, gan_head=head, gan_depths=[0.5])
    blocks = transformer_blocks(fake.unet)
    ran = []
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    condition = teacher.encode_prompts(["a cat", "dog"])
    x_t, t = torch.randn(2, *teacher.sample_shape), torch.tensor([100, 900])
    logits = fake(x_t, t, condition, output="logits")
    assert ran == [0]  # a logit-only pass stops after the deepest chosen block
    tokens = (teacher.sample_shape[1] // 2) * (teacher.sample_shape[2] // 2)
    assert logits.shape == ((2,) if head == "bottleneck" else (2, tokens))
    if head == "bottleneck":  # the head and the blocks up to the chosen depth get gradients, the rest none
        logits.sum().backward()
        assert all(p.grad is not None for p in fake.head.parameters())
        assert any(p.grad is not None for p in blocks[0].parameters())
        assert all(p.grad is None for p in blocks[-1].parameters())
    ran.clear()
    x0, same = fake(x_t, t, condition, output="x0+logits")
    assert ran == list(range(len(blocks))) and torch.allclose(same, logits, atol=1e-5)
    assert torch.allclose(x0, fake(x_t, t, condition), atol=1e-6)


def test_lora_and_bf16_share_base(teacher):
    teacher.unet.to(torch.bfloat16)
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, [999], share_frozen=True)
    add_lora(generator.unet, LoRAConfig(rank=2))
    names = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(generator.unet)}
    assert {"to_q", "add_q_proj", "to_add_out"} <= names
    trained = [p for p in generator.unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    base = dict(generator.unet.named_parameters())
    assert any(p.data_ptr() == q.data_ptr() for p in base.values() for q in teacher.unet.parameters())
    condition = teacher.encode_prompts(["a cat"])
    x0 = generator(torch.randn(1, *teacher.sample_shape), condition)
    x0.square().mean().backward()
    assert all(p.grad is not None for p in trained)
    assert all(q.grad is None for q in teacher.unet.parameters())
