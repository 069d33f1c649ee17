import pytest
import torch

from onestep.errors import UserInputError
from onestep.models.conditioning import Condition
from onestep.models.teacher import Teacher
from tests.conftest import save_folder, scheduler, tiny_text_unet, tiny_unet


def _direct_x0(out, x_t, abar, kind):
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return {"epsilon": (x_t - s * out) / a, "v_prediction": a * x_t - s * out, "sample": out}[kind]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_read_out_per_prediction_type(kind):
    sched = scheduler(kind, zero_snr=False)
    teacher = Teacher(tiny_unet(num_classes=None), sched)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 700])
    out = teacher.unet(x_t, t).sample
    expected = _direct_x0(out.double(), x_t.double(), sched.alphas_cumprod[t].double().view(-1, 1, 1, 1), kind)
    assert torch.allclose(teacher.x0(x_t, t, Condition()).double(), expected, atol=1e-4)


def test_class_guidance_formula_and_null_label(class_teacher):
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([500] * 4)
    labels = torch.tensor([0, 1, 2, 1])
    cond = class_teacher.x0(x_t, t, Condition(class_labels=labels), guidance_scale=1.0)
    uncond = class_teacher.x0(x_t, t, Condition(class_labels=torch.full((4,), 3)), guidance_scale=1.0)
    guided = class_teacher.x0(x_t, t, Condition(class_labels=labels), guidance_scale=2.5)
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert not torch.allclose(cond, uncond)  # the null label really is a different embedding
    assert class_teacher.num_classes == 3


def test_teacher_is_frozen_and_gives_no_gradient(class_teacher):
    assert not any(p.requires_grad for p in class_teacher.parameters())
    x_t = torch.randn(2, 1, 8, 8, requires_grad=True)
    out = class_teacher.x0(x_t, torch.tensor([10, 20]), Condition(class_labels=torch.tensor([0, 1])))
    assert not out.requires_grad
    through = class_teacher.x0_with_grad(x_t, torch.tensor([10, 20]), Condition(class_labels=torch.tensor([0, 1])))
    through.sum().backward()
    assert x_t.grad is not None and all(p.grad is None for p in class_teacher.parameters())


def test_text_teacher_guidance_uses_empty_prompt(text_teacher):
    prompts = ["a cat", "dog"]
    cond = text_teacher.condition(prompts=prompts)
    assert cond.encoder_hidden_states.shape == (2, 8, 16)
    null = text_teacher.null_condition(cond)
    assert torch.allclose(null.encoder_hidden_states[0], text_teacher.encode_prompts([""]).encoder_hidden_states[0])
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 300])
    c = text_teacher.x0(x_t, t, cond, guidance_scale=1.0)
    u = text_teacher.x0(x_t, t, null, guidance_scale=1.0)
    g = text_teacher.x0(x_t, t, cond, guidance_scale=7.5)
    assert torch.allclose(g, u + 7.5 * (c - u), atol=1e-4)


def test_latent_encode_decode_uses_scaling_factor(text_teacher):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    latents = text_teacher.encode(images)
    torch.manual_seed(0)
    raw = text_teacher.vae.encode(images).latent_dist.sample()
    assert torch.allclose(latents, raw * text_teacher.vae.config.scaling_factor, atol=1e-6)
    assert latents.shape == (2, 4, 8, 8)
    decoded = text_teacher.decode(latents)
    assert torch.allclose(decoded, text_teacher.vae.decode(raw).sample, atol=1e-5)


def test_from_pretrained_round_trip(tmp_path, class_teacher):
    save_folder(tmp_path / "t", "ClassConditionalDiffusionPipeline", unet=class_teacher.unet,
                          scheduler=class_teacher.scheduler)
    loaded = Teacher.from_pretrained(tmp_path / "t")
    x_t, t, c = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), Condition(class_labels=torch.tensor([0, 2]))
    assert torch.equal(loaded.x0(x_t, t, c), class_teacher.x0(x_t, t, c))
    assert loaded.schedule.prediction_type == "v_prediction"


def test_from_pretrained_text_folder(tmp_path, text_teacher):
    save_folder(tmp_path / "t", "StableDiffusionPipeline", unet=text_teacher.unet,
                          scheduler=text_teacher.scheduler, vae=text_teacher.vae,
                          text_encoder=text_teacher.text_encoder, tokenizer=text_teacher.tokenizer)
    loaded = Teacher.from_pretrained(tmp_path / "t")
    assert torch.allclose(loaded.encode_prompts(["a cat"]).encoder_hidden_states,
                          text_teacher.encode_prompts(["a cat"]).encoder_hidden_states)
    assert loaded.is_text and loaded.vae is not None


def test_from_pretrained_errors_are_one_line(tmp_path, class_teacher):
    with pytest.raises(UserInputError, match="not found"):
        Teacher.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no unet/ subfolder"):
        Teacher.from_pretrained(tmp_path / "empty")
    save_folder(tmp_path / "t", "X", unet=class_teacher.unet, scheduler=class_teacher.scheduler)
    weights = tmp_path / "t" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(UserInputError, match="cannot load") as err:
        Teacher.from_pretrained(tmp_path / "t")
    assert "\n" not in str(err.value)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, class_teacher):
    save_folder(tmp_path / "t", "X", unet=class_teacher.unet, scheduler=class_teacher.scheduler)
    unet_dir = tmp_path / "t" / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(class_teacher.unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(UserInputError, match="pickle"):
        Teacher.from_pretrained(tmp_path / "t")
    assert Teacher.from_pretrained(tmp_path / "t", allow_pickle=True).num_classes == 3


def test_text_unet_condition_requires_text():
    teacher = Teacher(tiny_text_unet(), scheduler())
    assert teacher.is_text and teacher.num_classes is None
    with pytest.raises(ValueError, match="no text encoder"):
        teacher.condition(prompts=["a cat"])
