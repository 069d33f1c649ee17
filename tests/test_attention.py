"""Attention backends: the choice on every device, same numbers from every backend that runs here, the processor
reaching every network of a distiller and of a run, and the backend stated in the training log."""

import json

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
)

from onestep.config import load_config
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.errors import UserInputError
from onestep.models.attention import resolve_backend, set_attention_backend, set_task_attention_backend
from onestep.models.networks import reachable_modules
from onestep.models.teacher import Teacher
from onestep.training.trainer import Trainer, TrainerConfig
from tests.conftest import scheduler, tiny_text_unet, tiny_unet
from tests.test_trainer import TwoModelTask


PROCESSOR = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


@pytest.mark.parametrize("requested, device, xformers, expected", [
    ("auto", "cuda", True, "xformers"),
    ("auto", "cuda", False, "sdpa"),
    ("auto", "cpu", True, "sdpa"),
    ("auto", "cpu", False, "sdpa"),
    ("auto", "mps", False, "sdpa"),
    ("xformers", "cuda", True, "xformers"),
    ("sdpa", "cuda", True, "sdpa"),
    ("sdpa", "cpu", False, "sdpa"),
    ("eager", "cuda", True, "eager"),
    ("eager", "cpu", False, "eager"),
])
def test_resolve_backend(requested, device, xformers, expected):
    assert resolve_backend(requested, device, xformers) == expected


@pytest.mark.parametrize("requested, device, xformers, words", [
    ("xformers", "cuda", False, "not installed"),
    ("xformers", "cpu", True, "needs a CUDA device"),
    ("xformers", "cpu", False, "needs a CUDA device"),
    ("flash", "cuda", True, "unknown attention backend 'flash'"),
])
def test_resolve_backend_errors(requested, device, xformers, words):
    with pytest.raises(UserInputError, match=words) as err:
        resolve_backend(requested, device, xformers)
    assert "\n" not in str(err.value)


def _processors(module: torch.nn.Module) -> list[type]:
    return [type(m.processor) for m in module.modules() if isinstance(m, Attention)]


def _forward_backward(unet, backend: str, **cond) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and parameter gradients of one forward + backward on fixed inputs."""
    assert set_attention_backend(unet, backend) == backend
    assert set(_processors(unet)) == {PROCESSOR[backend]}
    unet.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, unet.config.in_channels, 8, 8, generator=generator).requires_grad_()
    out = unet(x, torch.tensor([10, 500, 990]), **cond).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, *(p.grad for p in unet.parameters())


@pytest.mark.parametrize("make_unet, cond", [
    (lambda: tiny_unet(num_classes=3), lambda: {"class_labels": torch.tensor([0, 1, 3])}),
    (tiny_text_unet, lambda: {"encoder_hidden_states": torch.randn(3, 5, 16,
                                                                   generator=torch.Generator().manual_seed(1))}),
], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_sdpa_and_eager_agree_in_outputs_and_gradients(make_unet, cond):
    unet = make_unet()
    assert len(_processors(unet)) >= 2  # attention in a down, mid and up block
    eager = _forward_backward(unet, "eager", **cond())  # eager first: the UNets are built with SDPA
    sdpa = _forward_backward(unet, "sdpa", **cond())
    assert len(eager) == len(sdpa)
    for a, b in zip(eager, sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_xformers_here_is_a_clear_error_and_changes_nothing():
    unet = tiny_unet()
    set_attention_backend(unet, "eager")
    for backend, words in [("xformers", "xformers"), ("flash", "unknown attention backend")]:
        with pytest.raises(UserInputError, match=words) as err:
            set_attention_backend(unet, backend)
        assert "\n" not in str(err.value)
    assert set(_processors(unet)) == {AttnProcessor}


def test_added_kv_layers_keep_their_kind():
    torch.manual_seed(0)
    layer = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=12, cross_attention_dim=16,
                      norm_num_groups=4, processor=AttnAddedKVProcessor())
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    eager = layer(x, encoder_hidden_states=context)
    set_attention_backend(layer, "sdpa")
    assert isinstance(layer.processor, AttnAddedKVProcessor2_0)
    torch.testing.assert_close(layer(x, encoder_hidden_states=context), eager, atol=2e-5, rtol=1e-4)


def test_unscaled_attention_refuses_sdpa():
    layer = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)
    with pytest.raises(UserInputError, match="scale_qk=False"):
        set_attention_backend(layer, "sdpa")
    assert set_attention_backend(layer, "eager") == "eager"


def test_every_network_of_a_distiller_gets_the_processor():
    dmd = build_distiller("dmd2", Teacher(tiny_unet(), scheduler()), DMDOptions(gan=False), batch_size=4)
    assert {id(m) for m in reachable_modules(dmd)} >= {id(dmd.teacher), id(dmd.generator), id(dmd.fake)}
    assert set_task_attention_backend(dmd, "eager", "cpu") == "eager"
    for network in (dmd.teacher.unet, dmd.generator.unet, dmd.fake.unet):
        assert _processors(network) and set(_processors(network)) == {AttnProcessor}


def test_runs_apply_the_configured_backend(tmp_path):
    from onestep.runs import build_distiller_task

    with pytest.raises(UserInputError, match="config attention must be one of auto, sdpa, xformers, eager"):
        load_config("configs/digits/dmd2.yaml", [f"output_dir={tmp_path}", "attention=flash"])
    cfg = load_config("configs/digits/dmd2.yaml", [f"output_dir={tmp_path}", "attention=eager"])
    task = build_distiller_task(cfg)
    assert task.attention_backend == "eager"
    for network in (task.teacher.unet, task.generator.unet, task.fake.unet):
        assert _processors(network) and set(_processors(network)) == {AttnProcessor}
    default = load_config("configs/digits/dmd2.yaml", [f"output_dir={tmp_path}"])
    assert default.attention == "auto" and build_distiller_task(default).attention_backend == "sdpa"  # on a CPU


def test_teacher_training_runs_the_configured_backend(tmp_path):
    from onestep.runs import build_trainer

    cfg = load_config("configs/digits/teacher.yaml", [f"output_dir={tmp_path}", "attention=eager"])
    task = build_trainer(cfg).task
    assert task.attention_backend == "eager" and set(_processors(task.unet)) == {AttnProcessor}


def test_training_log_states_the_backend(tmp_path):
    task = TwoModelTask()
    task.attention_backend = "sdpa"
    Trainer(task, tmp_path, TrainerConfig(max_steps=1, checkpoint_every=0)).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["attention"] for r in records if r.get("event") == "started"] == ["sdpa"]


def test_bench_attention_suite_reports_every_backend(tmp_path, monkeypatch, capsys):
    from onestep.bench import attention as attention_bench
    from onestep.cli import main

    monkeypatch.setattr(attention_bench, "BATCH", 1)
    monkeypatch.setattr(attention_bench, "WARMUP", 0)
    monkeypatch.setattr(attention_bench, "REPEATS", 1)
    assert main(["bench", "--suite", "attention", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["backend"], r["precision"]) for r in report["rows"]] == [("sdpa", "fp32"), ("eager", "fp32")]
    assert report["eager_over_sdpa"]["fp32"] > 0 and report["device"].startswith("cpu")
    assert json.loads((tmp_path / "attention.json").read_text()) == report
    assert main(["bench", "--out", str(tmp_path)]) == 2  # the other suites still need runs
    assert "needs at least one run folder" in capsys.readouterr().err
