"""Precision and memory options: bf16 autocast keeps the distillation arithmetic in float32, a half-precision teacher,
gradient checkpointing that leaves frozen calls frozen, torch.compile."""

import functools
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import onestep.distillers.dmd as dmd_module
from onestep.cli import main
from onestep.config import load_config
from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.models.teacher import Teacher
from onestep.models.unet import enable_gradient_checkpointing
from onestep.runs import load_teacher
from onestep.training.trainer import Trainer, TrainerConfig
from tests.conftest import scheduler, tiny_unet


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "dmd2.yaml"


def _dmd(teacher: Teacher | None = None, **options):
    teacher = teacher or Teacher(tiny_unet(num_classes=3), scheduler())
    torch.manual_seed(0)
    real = RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))
    return build_distiller("dmd2", teacher, DMDOptions(generator_every=1, **options), real=real, batch_size=4)


@pytest.fixture
def own_accelerator_state():
    """accelerate fixes the mixed precision once per process: a test that changes it starts and leaves it fresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_trains_dmd2_with_float32_distillation_arithmetic(tmp_path, monkeypatch, own_accelerator_state):
    dmd = _dmd()
    seen: dict[str, set] = {"unet": set(), "dm": set(), "gan": set(), "loss": set()}
    dmd.generator.unet.register_forward_hook(lambda m, i, out: seen["unet"].add(out[0].dtype))
    dm_loss = dmd_module.distribution_matching_loss

    def recording_dm_loss(x, mu_real, mu_fake):
        seen["dm"].update({x.dtype, mu_real.dtype, mu_fake.dtype})
        return dm_loss(x, mu_real, mu_fake)

    def recording_gan(loss):
        def run(*logits):
            out = loss(*logits)
            seen["gan"].add(out.dtype)
            return out
        return run

    def recording(loss):
        @functools.wraps(loss)
        def run(module):
            out = loss(module)
            seen["loss"].add(out.loss.dtype)
            return out
        return run

    monkeypatch.setattr(dmd_module, "distribution_matching_loss", recording_dm_loss)
    for name in ("gan_generator_loss", "gan_discriminator_loss"):
        monkeypatch.setattr(dmd_module, name, recording_gan(getattr(dmd_module, name)))
    monkeypatch.setattr(dmd, "generator_loss", recording(dmd.generator_loss))
    monkeypatch.setattr(dmd, "critic_loss", recording(dmd.critic_loss))
    Trainer(dmd, tmp_path, TrainerConfig(max_steps=3, mixed_precision="bf16", checkpoint_every=0)).train()
    assert seen["unet"] == {torch.bfloat16}  # the networks did run in bf16 ...
    assert seen["dm"] == seen["gan"] == seen["loss"] == {torch.float32}  # ... the loss arithmetic did not
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in dmd.generator.parameters())


def test_half_precision_teacher_and_float32_copies(tmp_path, capsys):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "teacher.dtype=bfloat16"])
    teacher = load_teacher(cfg)
    assert next(teacher.unet.parameters()).dtype == torch.bfloat16
    dmd = _dmd(teacher, gan=False)
    assert {p.dtype for p in [*dmd.generator.parameters(), *dmd.fake.parameters()]} == {torch.float32}
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    condition = teacher.condition(torch.tensor([1, 2]))
    assert teacher.x0(x_t, t, condition).dtype == torch.float32
    Trainer(dmd, tmp_path / "run", TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    assert main(["train", str(CONFIG), f"output_dir={tmp_path / 'bad'}", "teacher.dtype=int8"]) == 2
    assert "teacher.dtype" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_frozen_calls_frozen():
    plain, checkpointed = _dmd(), _dmd()
    for network in (checkpointed.generator, checkpointed.fake, checkpointed.teacher):
        enable_gradient_checkpointing(network)
    assert checkpointed.fake.unet.is_gradient_checkpointing
    grads = []
    for dmd in (plain, checkpointed):
        torch.manual_seed(3)
        dmd.generator_loss(dmd.generator).loss.backward()  # the GAN term calls the fake score frozen
        assert all(p.grad is None for p in dmd.fake.parameters())
        torch.manual_seed(4)
        dmd.critic_loss(dmd.fake).loss.backward()
        grads.append([p.grad for p in [*dmd.generator.parameters(), *dmd.fake.parameters()]])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_trainer_turns_on_gradient_checkpointing(tmp_path):
    dmd = _dmd()
    Trainer(dmd, tmp_path, TrainerConfig(max_steps=2, checkpoint_every=0, gradient_checkpointing=True)).train()
    assert dmd.generator.unet.is_gradient_checkpointing and dmd.fake.unet.is_gradient_checkpointing


def test_compile_option_runs(tmp_path):
    try:
        torch.compile(lambda x: x + 1, backend="eager")(torch.zeros(1))
    except Exception as err:  # noqa: BLE001 - any failure means: no torch.compile here
        pytest.skip(f"torch.compile does not run here: {type(err).__name__}: {err}")
    dmd = _dmd(gan=False)
    # the eager backend traces with dynamo like inductor does but skips code generation (minutes on a small CPU)
    config = TrainerConfig(max_steps=2, checkpoint_every=0, compile=True, compile_backend="eager")
    Trainer(dmd, tmp_path, config).train()
    assert dmd.generator.unet._compiled_call_impl is not None and dmd.fake.unet._compiled_call_impl is not None
    assert all(torch.isfinite(p).all() for p in dmd.generator.parameters())


def test_offloaded_teacher_moves_for_its_calls_only(tmp_path, monkeypatch):
    dmd = _dmd(gan=False)
    unet_moves, teacher_moves = [], []
    unet_to, teacher_to = dmd.teacher.unet.to, dmd.teacher.to
    monkeypatch.setattr(dmd.teacher.unet, "to", lambda *a, **k: unet_moves.append(str(a[0])) or unet_to(*a, **k))
    monkeypatch.setattr(dmd.teacher, "to", lambda *a, **k: teacher_moves.append(a) or teacher_to(*a, **k))
    dmd.teacher.offload("cpu")  # no GPU here: "cpu" stands for the accelerator, the mechanics are the same
    Trainer(dmd, tmp_path, TrainerConfig(max_steps=1, checkpoint_every=0)).train()
    assert dmd.teacher.device == torch.device("cpu") and teacher_moves == []  # the Trainer left it alone
    assert unet_moves == ["cpu", "cpu", "cpu"]  # offload, then to the device and back around its one call
