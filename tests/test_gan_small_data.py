"""The small-data GAN fixes of DMD2's discriminator: R1 (Mescheder et al. 2018, eq. 9) and DiffAugment (Zhao et al.
2020) against direct re-computations on small tensors, where their gradients go, and a short run with both on."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, XFormersAttnProcessor
from torch.nn.attention import SDPBackend, sdpa_kernel

from onestep.cli import main
from onestep.distillers.dmd import DMDOptions
from onestep.errors import UserInputError
from onestep.models.augment import augment_ops, color, cutout, diff_augment, translation
from onestep.models.critics import r1_penalty
from onestep.models.unet import enable_gradient_checkpointing
from tests.test_dmd import _dmd, _spy_gan


# --- R1 ---------------------------------------------------------------------------------------------------------
def test_r1_penalty_and_its_parameter_gradient_equal_the_closed_form():
    """D(x) = sum_i w_i tanh(x_i): grad_x D = w (1 - tanh^2 x), so R1 = sum_i w_i^2 (1 - tanh^2 x_i)^2 per sample and
    dR1/dw = 2 w (1 - tanh^2 x)^2 summed over the batch (the double backward the critic trains with)."""
    torch.manual_seed(0)
    w = torch.randn(2, 3, 3, requires_grad=True)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = (w * torch.tanh(x)).flatten(1).sum(1)
    penalty = r1_penalty(logits, x)
    slope = 1 - torch.tanh(x.detach()) ** 2
    assert torch.allclose(penalty, (w.detach() ** 2 * slope**2).flatten(1).sum(1), atol=1e-6)
    penalty.sum().backward()
    assert torch.allclose(w.grad, (2 * w.detach() * slope**2).sum(0), atol=1e-5)


def _recomputed_r1(dmd, real_t, t, condition):
    """mean_b ||grad_x D(x)||^2 at the discriminator's real input, by hand (math attention: it double-backwards)."""
    x = real_t.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(dmd.fake(x, t, condition, output="logits").sum(), x)
    return grad.square().flatten(1).sum(1).mean()


def _spy_conditions(dmd):
    conditions, forward = [], dmd.fake.forward

    def spy(x_t, t, condition, output="x0"):
        if "logits" in output:
            conditions.append(condition)
        return forward(x_t, t, condition, output)

    dmd.fake.forward = spy
    return conditions


@pytest.mark.parametrize("step, applied", [(6, True), (7, False)])
def test_critic_loss_adds_every_times_gamma_over_2_r1_on_the_lazy_steps(step, applied):
    dmd = _dmd(DMDOptions(gan_r1_gamma=0.8, gan_r1_every=3, gan_critic_weight=0.7), batch=4)
    conditions = _spy_conditions(dmd)
    seen, _ = _spy_gan(dmd)
    dmd.begin_step(step)
    out = dmd.critic_loss(dmd.fake)
    expected = out.logs["denoising"] + 0.7 * out.logs["gan_d"]
    if applied:
        real_t, t, _ = seen[1]  # the critic's real input (fake first, then real)
        r1 = _recomputed_r1(dmd, real_t, t, conditions[1]).item()
        assert r1 > 0 and out.logs["r1"] == pytest.approx(r1, rel=1e-4)
        expected += 0.7 * 3 * 0.8 / 2 * r1  # beside the D loss (its weight); lazy: scaled by the interval
    else:
        assert "r1" not in out.logs
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_r1_is_zero_when_off():
    dmd = _dmd(DMDOptions(gan_critic_weight=0.7), batch=4)
    assert DMDOptions().gan_r1_gamma == 0  # the default: DMD2's code has no penalty
    out = dmd.critic_loss(dmd.fake)
    assert "r1" not in out.logs
    assert out.loss.item() == pytest.approx(out.logs["denoising"] + 0.7 * out.logs["gan_d"], rel=1e-6)


def test_r1_gradients_reach_the_critic_only_and_match_with_gradient_checkpointing():
    dmd = _dmd(DMDOptions(gan_r1_gamma=1.0), batch=4)
    real, condition = dmd.real.sample(4, dmd.device)
    real_t, t = dmd.gan_input(real)

    def penalty_grads():
        dmd.fake.zero_grad(set_to_none=True)
        _, penalty = dmd._real_logits_and_r1(dmd.fake, real_t, t, condition)
        penalty.backward()
        assert all(p.grad is None for p in dmd.generator.parameters())
        assert all(p.grad is None for p in dmd.teacher.unet.parameters())
        grads = {name: p.grad for name, p in dmd.fake.named_parameters()}
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("head."))
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("unet."))
        return grads

    plain = penalty_grads()
    enable_gradient_checkpointing(dmd.fake)  # train.gradient_checkpointing: the double backward recomputes
    checkpointed = penalty_grads()
    for name, g in plain.items():
        assert (g is None) == (checkpointed[name] is None), name
        if g is not None:
            assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=1e-4), name


def test_r1_refuses_xformers_attention_and_fsdp_in_one_line(monkeypatch):
    dmd = _dmd(DMDOptions(gan_r1_gamma=1.0), batch=2)
    real, condition = dmd.real.sample(2, dmd.device)
    inputs = (*dmd.gan_input(real), condition)
    layer = next(m for m in dmd.fake.unet.modules() if isinstance(m, Attention))
    previous = layer.processor
    layer.set_processor(XFormersAttnProcessor())
    with pytest.raises(UserInputError, match="xformers attention lacks"):
        dmd._real_logits_and_r1(dmd.fake, *inputs)
    layer.set_processor(previous)
    monkeypatch.setattr("onestep.distillers.dmd.is_sharded", lambda module: module is dmd.fake)
    with pytest.raises(UserInputError, match="not supported under FSDP"):
        dmd._real_logits_and_r1(dmd.fake, *inputs)


def test_bad_small_data_options_are_refused():
    for options, message in ((DMDOptions(gan_r1_gamma=-1.0), "gan_r1_gamma >= 0"),
                             (DMDOptions(gan_r1_every=0), "gan_r1_every >= 1"),
                             (DMDOptions(gan_augment="translation,flip"), "unknown augmentation 'flip'"),
                             (DMDOptions(gan=False, gan_r1_gamma=1.0), "set gan: true")):
        with pytest.raises(ValueError, match=message):
            options.validate()


# --- DiffAugment ------------------------------------------------------------------------------------------------
def _shifted(x, dy, dx, pad=2):
    """x moved down by dy and right by dx (|dy|, |dx| <= pad), zero-filled: a window of the zero-padded x."""
    height, width = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return padded[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def test_ops_parse_and_an_empty_policy_is_the_identity():
    assert augment_ops("translation, cutout") == augment_ops(["translation", "cutout"]) == ("translation", "cutout")
    x = torch.randn(3, 2, 8, 8)
    for off in ("", [], None):
        assert diff_augment(x, off) is x
    for policy in ("translation", "cutout", "color", "color,translation,cutout"):
        assert diff_augment(x, policy).shape == x.shape


def test_translation_shifts_each_sample_by_its_own_offset_within_an_eighth():
    x = torch.arange(1, 2 * 16 * 16 + 1, dtype=torch.float32).view(1, 2, 16, 16).repeat(200, 1, 1, 1)
    out = translation(x, torch.Generator().manual_seed(0))
    shifts = []
    for sample, moved in zip(x, out, strict=True):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(moved, _shifted(sample, dy, dx))]
        assert len(matches) == 1  # the documented effect: one zero-filled shift of at most 16 / 8 = 2 pixels
        shifts.append(matches[0])
    assert set(shifts) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 offsets, per sample


def test_cutout_zeroes_one_half_size_square_per_sample_and_keeps_the_rest():
    x = torch.rand(300, 3, 8, 8) + 1  # no zeros of its own
    out = cutout(x, torch.Generator().manual_seed(0))
    corners = set()
    for sample, cut in zip(x, out, strict=True):
        zero = cut == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # the same square in every channel
        assert torch.equal(cut[~zero], sample[~zero])
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        assert zero[0].sum() == len(rows) * len(cols) and zero[0][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        top, left = rows[0].item(), cols[0].item()
        # a 4 x 4 square centred at (cy, cx) in [0, 8]^2, cut at the borders
        assert len(rows) == 4 or top == 0 or rows[-1] == 7
        assert len(cols) == 4 or left == 0 or cols[-1] == 7
        assert len(rows) >= 2 and len(cols) >= 2
        corners.add((top, left, len(rows), len(cols)))
    assert len(corners) > 30  # drawn independently per sample


def test_color_on_a_flat_sample_is_a_brightness_offset_in_half_a_unit():
    x = torch.ones(500, 3, 4, 4) * torch.rand(500, 1, 1, 1)  # flat: saturation and contrast scale zero deviations
    offset = color(x, torch.Generator().manual_seed(0)) - x
    assert torch.allclose(offset, offset[:, :1, :1, :1].expand_as(offset), atol=1e-6)
    assert offset.min() >= -0.5 and offset.max() < 0.5 and offset.std() > 0.25  # U[-0.5, 0.5): std 0.29


def test_gradients_flow_through_the_augmentation_to_its_input():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    policy = "color,translation,cutout"
    assert torch.autograd.gradcheck(lambda v: diff_augment(v, policy, torch.Generator().manual_seed(1)), (x,))


def test_the_discriminator_reads_augmented_real_and_fake_inputs_in_both_losses():
    """gan_t_max 0 shows the clean inputs: every one of the discriminator's three reads (generator's fake,
    critic's fake, critic's real) carries a cutout square of exact zeros, which a sample itself has none of."""
    dmd = _dmd(DMDOptions(gan_augment=["cutout"], gan_t_max=0.0), batch=6)
    seen, _ = _spy_gan(dmd)
    out = dmd.generator_loss(dmd.generator)
    dmd.critic_loss(dmd.fake)
    assert len(seen) == 3
    for x_t, _, _ in seen:
        assert ((x_t == 0).flatten(1).sum(1) >= 4).all()
    out.loss.backward()  # the generator's GAN term differentiates through the augmentation
    assert all(torch.isfinite(p.grad).all() for p in dmd.generator.parameters() if p.grad is not None)


# --- a short run ------------------------------------------------------------------------------------------------
def test_dmd2_with_r1_and_diffaugment_trains_on_digits(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "configs/digits/dmd2.yaml", f"output_dir={out}", "train.max_steps=3",
                 "train.max_minutes=null", "train.log_every=1", "train.eval_every=0", "data.batch_size=4",
                 "eval.features=none", "options.gan=true", "options.gan_r1_gamma=1.0", "options.gan_r1_every=2",
                 "options.gan_augment=translation,cutout"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "elapsed_s" in r and "critic/loss" in r]
    assert len(steps) == 3
    assert all(v == v and abs(v) != float("inf") for r in steps for k, v in r.items() if isinstance(v, float))
    r1 = [r["critic/r1"] for r in steps]  # a log keeps its last value: the lazy R1 is fresh at steps 0 and 2 only
    assert r1[0] == r1[1] != r1[2] and min(r1) > 0
    assert steps[0]["critic/loss"] != steps[1]["critic/loss"] and "critic/gan_d" in steps[0]
