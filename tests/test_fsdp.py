"""FSDP2 against DDP on two CPU processes (gloo): the same weights after k steps, a sharded checkpoint that resumes,
frozen calls that send no gradient, EMA weights gathered into the export (tests/fsdp_worker.py). Plus, in this
process, the checks that select and refuse the FSDP path."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from onestep.errors import UserInputError
from onestep.models.lora import LoRAConfig
from onestep.models.networks import is_sharded
from onestep.models.unet import call_frozen
from onestep.training.sharding import FullStateEMA, Skeleton, swapped_attributes
from onestep.training.trainer import _check_sharding, _guard_shared_base
from tests.conftest import tiny_unet
from tests.test_lora import _dmd


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.fsdp_worker", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _exported_unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_fsdp_trains_like_ddp(runs, method):
    ddp, fsdp = (load_file(runs / backend / method / "weights.safetensors") for backend in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and any(k.startswith("critic.head.") for k in ddp) == (method == "dmd2")
    assert any(".lora_A." in k for k in ddp) == (method == "sid")  # SiD: LoRA adapters over a frozen base
    # both trained: every network moved from where it started (the teacher's weights; SiD's LoRA B matrices start at
    # 0) by 5x the tolerance below (atol 2e-5), so agreeing weights are not just two untouched copies
    start = {f"{name}.unet.{k}": v for name in ("generator", "critic") for k, v in tiny_unet(num_classes=3)
             .state_dict().items()}
    for name in ("generator", "critic"):
        for weights in (ddp, fsdp):
            moved = [(weights[k] - start.get(k, 0.0)).abs().max() for k in weights if k.startswith(name + ".")
                     and (".lora_B." in k if method == "sid" else k in start)]
            assert moved and max(moved) > 1e-4, name
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=2e-5, msg=key)
    for backend, kind in (("ddp", "MULTI_CPU"), ("fsdp", "FSDP")):
        records = [r for r in _log(runs / backend / method) if r.get("event") in ("started", "resumed")]
        assert {(r["num_processes"], r["distributed_type"]) for r in records} == {(2, kind)}
    ddp_log, fsdp_log = ([r[k] for r in _log(runs / b / method) if "critic/loss" in r for k in sorted(r)
                          if k.endswith("loss")] for b in ("ddp", "fsdp"))
    torch.testing.assert_close(torch.tensor(fsdp_log), torch.tensor(ddp_log), rtol=1e-4, atol=1e-6)


def test_fsdp_checkpoints_are_sharded_and_resume(runs):
    run = runs / "fsdp" / "dmd2"
    assert [r["event"] for r in _log(run) if r.get("event") in ("started", "resumed")] == ["started", "resumed"]
    assert [r["step"] for r in _log(run) if "critic/loss" in r] == [1, 2, 3, 4]
    saved = {p.name for p in (run / "checkpoints" / "checkpoint-0000002").iterdir()}
    assert {"pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"} <= saved  # DCP shards


def test_fsdp_export_gathers_the_ema_weights_and_merges_adapters(runs):
    ddp, fsdp = (_exported_unet(runs / b / "dmd2") for b in ("ddp", "fsdp"))
    live = {k.removeprefix("generator.unet."): v
            for k, v in load_file(runs / "fsdp" / "dmd2" / "weights.safetensors").items()
            if k.startswith("generator.unet.")}
    assert ddp.keys() == fsdp.keys() == live.keys()
    assert max(float((fsdp[k] - live[k]).abs().max()) for k in live) > 1e-5  # the export holds the EMA, not live
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)
    ddp, fsdp = (_exported_unet(runs / b / "sid") for b in ("ddp", "fsdp"))  # LoRA merged into a plain UNet
    assert ddp.keys() == fsdp.keys() == live.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_frozen_calls_of_a_sharded_critic_send_it_no_gradient(runs, method):
    """The generator losses call the critic frozen (DMD2's GAN logit, SiD's fake score, checkpointed): after their
    backward pass the generator has gradients, the critic none, under DDP and FSDP alike."""
    for backend in ("ddp", "fsdp"):
        assert json.loads((runs / backend / method / "frozen.json").read_text()) == {
            "generator": [True, True], "critic": [False, False]}


def test_fsdp_and_deepspeed_paths_are_refused_for_fsdp1_and_a_shared_lora_base():
    """FSDP would shard, DeepSpeed cast (and under ZeRO-3 partition) the teacher's tensors a shared LoRA base holds;
    on the other paths a shared base only registers the resume guard (tests/test_lora.py)."""
    with pytest.raises(UserInputError, match="fsdp_version: 2"):
        _check_sharding(SimpleNamespace(is_fsdp2=False))
    _check_sharding(SimpleNamespace(is_fsdp2=True))
    dmd = _dmd(LoRAConfig(rank=2, critic=True), gan=True)
    own = _dmd(LoRAConfig(rank=2, critic=True, share_base=False), gan=True)
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MULTI_GPU):
        hooks = []
        accelerator = SimpleNamespace(distributed_type=kind, register_load_state_pre_hook=hooks.append)
        if kind == DistributedType.MULTI_GPU:
            _guard_shared_base(accelerator, dmd, dmd.updates())
            assert len(hooks) == 1
        else:
            with pytest.raises(UserInputError, match=f"under {kind.value}.*share_base=false"):
                _guard_shared_base(accelerator, dmd, dmd.updates())
        _guard_shared_base(accelerator, own, own.updates())  # own copies of the base: nothing to guard
        assert len(hooks) == (kind == DistributedType.MULTI_GPU)


def test_unsharded_networks_keep_their_plain_paths():
    """Without FSDP: call_frozen's functional path, EMA checkpoints as diffusers' EMAModel, and a Skeleton that
    materializes into a plain copy the attribute swap puts in place."""
    unet = tiny_unet()
    assert not is_sharded(unet)
    x, t = torch.randn(2, 1, 8, 8, requires_grad=True), torch.tensor([3, 7])
    call_frozen(unet, x, t, class_labels=torch.tensor([0, 1])).sample.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in unet.parameters())

    params = list(unet.parameters())
    ema = FullStateEMA(params, decay=0.5)
    state = ema.state_dict()
    torch.manual_seed(1)
    other = FullStateEMA([torch.nn.Parameter(torch.randn_like(p)) for p in params], decay=0.5)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow_params, ema.shadow_params, strict=True))

    skeleton = Skeleton(unet)
    assert all(p.device.type == "meta" for p in skeleton.module.parameters())
    # gathered weights unlike the live ones (the export's EMA weights): the skeleton holds and computes with them
    torch.manual_seed(2)
    gathered = {k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    plain = skeleton.materialize({k: v.clone() for k, v in gathered.items()})
    assert plain is not unet and all(p.device.type == "cpu" for p in plain.parameters())
    assert plain.state_dict().keys() == gathered.keys()
    assert all(torch.equal(v, gathered[k]) for k, v in plain.state_dict().items())
    reference = tiny_unet()
    reference.load_state_dict(gathered)
    with torch.no_grad():
        labels = torch.tensor([0, 1])
        expected = reference(x, t, class_labels=labels).sample
        assert torch.equal(plain(x, t, class_labels=labels).sample, expected)
        assert not torch.allclose(unet(x, t, class_labels=labels).sample, expected)  # not the live weights
    holder = SimpleNamespace(unet=unet)
    with swapped_attributes(holder, {id(unet): plain}):
        assert holder.unet is plain
    assert holder.unet is unet
