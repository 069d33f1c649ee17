"""LoRA students and critics: only adapters train, the base stays frozen, merged and adapter exports reproduce them."""

import json
from pathlib import Path

import pytest
import torch

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.distillers.sid import SiDOptions
from onestep.distillers.stages import init_generator
from onestep.models.loading import load_model
from onestep.models.lora import LORA_WEIGHTS, LoRAConfig, load_lora_weights, lora_layers
from onestep.models.teacher import Teacher
from onestep.pipelines import OneStepPipeline
from onestep.sampling.inference import load_sampler
from onestep.training.trainer import Trainer, TrainerConfig
from tests.conftest import scheduler, tiny_unet


pytest.importorskip("peft")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits" / "dmd2.yaml")


def _dmd(lora: LoRAConfig, **options):
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    real = RealImages(torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (20,)))
    return build_distiller("dmd2", teacher, DMDOptions(lora=lora, generator_every=1, **options), real=real,
                           batch_size=4)


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _randomise_adapters(unet) -> None:
    """Non-zero B matrices (they start at 0), so that an adapter that went missing would show in the outputs."""
    torch.manual_seed(1)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


def test_only_adapters_train_and_the_critic_head_trains_fully():
    dmd = _dmd(LoRAConfig(rank=2, critic=True))
    generator, fake = _trainable(dmd.generator), _trainable(dmd.fake)
    assert generator and all(".lora_A." in n or ".lora_B." in n for n in generator)
    expected = sum(p.numel() for _, layer in lora_layers(dmd.generator.unet) for n, p in layer.named_parameters()
                   if n.startswith(("lora_A", "lora_B")))
    assert sum(p.numel() for p in generator.values()) == expected
    assert expected < 0.5 * sum(p.numel() for p in dmd.generator.parameters())
    assert {n for n in fake if not n.startswith("head.")} == {f"unet.{n}" for n in _trainable(dmd.fake.unet)}
    assert sum(p.numel() for n, p in fake.items() if n.startswith("head.")) == sum(
        p.numel() for p in dmd.fake.head.parameters())
    assert not lora_layers(dmd.teacher.unet)  # the teacher is never adapted
    plain_critic = _dmd(LoRAConfig(rank=2)).fake  # critic=False: the fake score trains every weight
    assert not lora_layers(plain_critic.unet) and all(p.requires_grad for p in plain_critic.parameters())


def test_a_training_step_moves_adapters_only(tmp_path):
    dmd = _dmd(LoRAConfig(rank=2, critic=True), gan=True)
    frozen = {n: p.detach().clone() for n, p in [*dmd.generator.named_parameters(), *dmd.fake.unet.named_parameters()]
              if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in dmd.generator.named_parameters() if "lora_B" in n}
    Trainer(dmd, tmp_path, TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    now = dict([*dmd.generator.named_parameters(), *dmd.fake.unet.named_parameters()])
    assert all(torch.equal(now[n], p) for n, p in frozen.items())
    assert any(not torch.equal(now[n], p) for n, p in adapters.items())


def test_merged_and_adapter_exports_reproduce_the_lora_generator(tmp_path):
    dmd = _dmd(LoRAConfig(rank=2))
    _randomise_adapters(dmd.generator.unet)
    dmd.export_pipeline(tmp_path / "merged")
    dmd.options.lora.export = "adapter"
    dmd.export_pipeline(tmp_path / "adapter")
    assert not (tmp_path / "merged" / LORA_WEIGHTS).exists() and (tmp_path / "adapter" / LORA_WEIGHTS).is_file()

    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([999, 400, 20]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        lora_out = dmd.generator.unet(x, t, class_labels=labels).sample
        merged = load_model(tmp_path / "merged" / "unet")  # a plain UNet2DModel folder, no adapters left
        torch.testing.assert_close(merged(x, t, class_labels=labels).sample, lora_out, rtol=1e-4, atol=1e-5)

        base = load_model(tmp_path / "adapter" / "unet")
        teacher_out = dmd.teacher.unet(x, t, class_labels=labels).sample
        torch.testing.assert_close(base(x, t, class_labels=labels).sample, teacher_out)  # the base is the start
        load_lora_weights(base, tmp_path / "adapter")  # peft: UNet2DModel has no diffusers LoRA loader
        torch.testing.assert_close(base(x, t, class_labels=labels).sample, lora_out)
        assert not torch.allclose(lora_out, teacher_out, atol=1e-3)
    for folder in ("merged", "adapter"):  # both are standard OneStepPipeline folders
        assert not lora_layers(OneStepPipeline.from_pretrained(tmp_path / folder).unet)
    # sampling, FD and init_generator read an adapter folder as the trained generator, not as its base
    merged_images, adapter_images = (load_sampler(tmp_path / f).sample(labels, 3, seed=0) for f in ("merged",
                                                                                                  "adapter"))
    torch.testing.assert_close(adapter_images, merged_images, rtol=1e-4, atol=1e-5)
    start = _dmd(LoRAConfig()).generator
    start.timesteps = dmd.generator.timesteps
    init_generator(start, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(start.unet(x, t, class_labels=labels).sample, lora_out, rtol=1e-4, atol=1e-5)


def test_adapter_export_loads_with_plain_diffusers_for_text_unets(tmp_path, text_teacher):
    sid = build_distiller("sid", text_teacher, SiDOptions(lora=LoRAConfig(rank=2, export="adapter")), batch_size=2)
    _randomise_adapters(sid.generator.unet)
    sid.export_pipeline(tmp_path / "pipe")
    pipe = OneStepPipeline.from_pretrained(tmp_path / "pipe")
    pipe.unet.load_lora_adapter(tmp_path / "pipe", prefix="unet", weight_name=LORA_WEIGHTS)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 100]), torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=text).sample,
                                   sid.generator.unet(x, t, encoder_hidden_states=text).sample)


def test_lora_resumes_and_is_validated(tmp_path, capsys):
    from onestep.cli import main

    config = CONFIG
    out = tmp_path / "run"
    common = [config, f"output_dir={out}", "train.max_steps=2", "train.max_minutes=null", "eval.num_samples=20",
              "eval.sampling_batch=20", "train.checkpoint_every=0", "options.lora.rank=2"]
    assert main(["train", *common]) == 0
    assert json.loads((out / "config.json").read_text())["options"]["lora"]["rank"] == 2
    assert main(["train", *common[:2], "train.max_steps=3", *common[3:]]) == 0  # resumes the LoRA checkpoint
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("event") in ("started", "resumed")] == ["started", "resumed"]
    capsys.readouterr()
    assert main(["train", config, f"output_dir={tmp_path / 'bad'}", "options.lora.export=zip"]) == 2
    assert "lora.export" in capsys.readouterr().err
    assert main(["train", config, f"output_dir={tmp_path / 'bad'}", "options.lora.rank=2",
                 "options.lora.target_modules=[nothing_like_this]"]) == 2
    assert "target_modules" in capsys.readouterr().err
    assert main(["train", config, f"output_dir={tmp_path / 'bad'}", "options.lora.rank=2",
                 "teacher.offload=true"]) == 2
    assert "options.lora.share_base=false" in capsys.readouterr().err  # an offloaded teacher cannot be a shared base


def test_a_run_folder_from_before_lora_still_resumes(tmp_path):
    from onestep.config import load_config, to_dict
    from onestep.errors import UserInputError
    from onestep.runs import RUN_CONFIG, check_output_dir

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    saved = to_dict(cfg)
    del saved["options"]["lora"]  # what older code wrote
    (tmp_path / RUN_CONFIG).write_text(json.dumps(saved))
    check_output_dir(cfg)  # the same run: no error
    with pytest.raises(UserInputError, match="different run"):
        check_output_dir(load_config(CONFIG, [f"output_dir={tmp_path}", "options.lora.rank=2"]))


def test_adapted_networks_share_the_teachers_frozen_weights_and_leave_them_untouched(tmp_path):
    """`lora.share_base`: the generator's and critic's frozen bases ARE the teacher's tensors (no copy); training,
    and loading a first stage's generator (`init_generator`), never write into them."""
    dmd = _dmd(LoRAConfig(rank=2, critic=True), gan=True)
    teacher = {id(t) for t in dmd.teacher.unet.parameters()}
    for unet in (dmd.generator.unet, dmd.fake.unet):
        frozen = [p for p in unet.parameters() if not p.requires_grad]
        assert frozen and all(id(p) in teacher for p in frozen)
        assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    assert not any(id(p) in teacher for p in _dmd(LoRAConfig(rank=2, critic=True, share_base=False)).generator.unet
                   .parameters())
    before = {k: v.clone() for k, v in dmd.teacher.unet.state_dict().items()}
    Trainer(dmd, tmp_path / "run", TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    assert all(torch.equal(v, before[k]) for k, v in dmd.teacher.unet.state_dict().items())

    stage1 = tmp_path / "run" / "pipeline"
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    stage2 = build_distiller("dmd2", teacher, DMDOptions(lora=LoRAConfig(rank=2), gan=False), init_generator=stage1,
                             batch_size=4)
    assert all(torch.equal(v, before[k]) for k, v in teacher.unet.state_dict().items())
    exported = load_model(stage1 / "unet").state_dict()  # the merged stage-1 generator is stage 2's frozen base
    base = {k.replace(".base_layer", ""): v for k, v in stage2.generator.unet.state_dict().items() if "lora_" not in k}
    assert base.keys() == exported.keys() and all(torch.equal(v, exported[k]) for k, v in base.items())


def test_a_resume_never_writes_into_the_shared_teacher(tmp_path):
    """accelerate's load_state copies each checkpointed tensor into the network in place, and with `share_base` the
    checkpoint's copy of the base is the teacher's tensor: a checkpoint whose base differs (another teacher) is
    refused in one line and the teacher keeps its weights; a normal resume goes on."""
    from safetensors.torch import load_file, save_file

    from onestep.errors import UserInputError
    from onestep.training.checkpoints import COMPLETE_MARKER, MANIFEST

    run = tmp_path / "run"
    Trainer(_dmd(LoRAConfig(rank=2, critic=True), gan=True), run, TrainerConfig(max_steps=1)).train()
    Trainer(_dmd(LoRAConfig(rank=2, critic=True), gan=True), run, TrainerConfig(max_steps=2)).train()  # resumes
    assert [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("event") in ("started", "resumed")] == ["started", "resumed"]

    dmd = _dmd(LoRAConfig(rank=2, critic=True), gan=True)
    teacher = {id(t) for t in dmd.teacher.unet.parameters()}
    shared = [n for n, p in dmd.generator.state_dict(keep_vars=True).items() if id(p) in teacher]
    assert "unet.conv_in.weight" in shared or "unet.conv_in.base_layer.weight" in shared
    checkpoint = run / "checkpoints" / "checkpoint-0000002"
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    for file in checkpoint.glob("model*.safetensors"):  # generator's, critic's
        state = load_file(file)
        for name in [n for n in state if n in shared and "conv_in" in n]:
            state[name] = state[name] + 1.0  # as another teacher's checkpoint would hold
        save_file(state, file)
        marker[MANIFEST][file.name] = file.stat().st_size  # a complete checkpoint, not a damaged one
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    before = {k: v.clone() for k, v in dmd.teacher.unet.state_dict().items()}
    with pytest.raises(UserInputError, match="holds a different unet.conv_in.*teacher is left as it is"):
        Trainer(dmd, run, TrainerConfig(max_steps=3)).train()
    assert all(torch.equal(v, before[k]) for k, v in dmd.teacher.unet.state_dict().items())


@pytest.mark.parametrize("dtype, loss_tolerance, grad_tolerance",
                         [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 0.01, 0.06)])
def test_a_shared_base_gives_the_losses_and_gradients_of_float32_copies(dtype, loss_tolerance, grad_tolerance):
    """Equivalence of `share_base` (the base in the teacher's dtype) with float32 copies of it: the same generator
    and critic losses and adapter gradients, exactly for a float32 teacher, within the tolerances (relative) for a
    bfloat16 one (the base then computes in bfloat16, as the teacher does; measured here: losses 0.48% (generator)
    and 0.09% (critic) apart, adapter gradients 4.2% and 2.0% in relative L2; an adapter scale 3% off on the
    shared path alone moves them to 4.9% and 6.9%)."""
    def losses_and_grads(share: bool):
        torch.manual_seed(0)
        teacher = Teacher(tiny_unet(num_classes=3).to(dtype), scheduler())
        dmd = build_distiller("dmd2", teacher, DMDOptions(lora=LoRAConfig(rank=2, critic=True, share_base=share),
                                                          gan=False), batch_size=4)
        for unet in (dmd.generator.unet, dmd.fake.unet):
            _randomise_adapters(unet)
        out = []
        for update in dmd.updates():
            torch.manual_seed(1)
            loss = update.loss(update.module).loss
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in update.module.parameters() if p.grad is not None])
            out.append((loss.detach(), grads))
        return out

    for (loss_s, grad_s), (loss_c, grad_c) in zip(losses_and_grads(True), losses_and_grads(False), strict=True):
        assert torch.allclose(loss_s, loss_c, rtol=loss_tolerance, atol=1e-7)
        assert (grad_s - grad_c).norm() <= grad_tolerance * grad_c.norm()
