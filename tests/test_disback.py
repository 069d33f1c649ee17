"""DisBack: the recorded path is ordered, loads strictly and ends on the teacher; the target really moves."""

import json

import pytest
import torch
from safetensors.torch import load_file

from onestep.distillers import build_distiller
from onestep.distillers.disback import DisBackOptions, DisBackSiDOptions, load_strict
from onestep.models.teacher import Teacher
from onestep.training.updates import OptimizerConfig
from tests.conftest import scheduler, teacher_input_grads, tiny_unet


def _options(cls=DisBackOptions, **overrides):
    settings = dict(num_checkpoints=3, steps_per_checkpoint=2, switch_every=10, generator_timesteps=[400],
                    gan=False, path_optimizer=OptimizerConfig(lr=1e-2))
    if cls is DisBackSiDOptions:
        settings.pop("generator_timesteps"), settings.pop("gan")
    return cls(**{**settings, **overrides})


def _disback(tmp_path, name="disback", cls=DisBackOptions, **overrides):
    torch.manual_seed(0)
    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    return build_distiller(name, teacher, _options(cls, **overrides), batch_size=4, path_dir=tmp_path / "path")


def _equal(unet, state) -> bool:
    return all(torch.equal(v, state[k].to(v.dtype)) for k, v in unet.state_dict().items())


def test_path_is_ordered_and_ends_on_the_exact_teacher(tmp_path):
    disback = _disback(tmp_path)
    assert [p.name for p in disback.path] == [f"checkpoint_{i:02d}.safetensors" for i in range(4)]
    states = [load_file(p) for p in disback.path]
    assert _equal(disback.true_teacher.unet, states[0])  # theta_0 is the teacher, bit for bit
    for a, b in zip(states, states[1:], strict=False):  # each recorded checkpoint moved away from the last
        assert any(not torch.equal(a[k].float(), b[k].float()) for k in a)


def test_fake_starts_at_the_end_and_target_walks_back_to_the_teacher(tmp_path):
    disback = _disback(tmp_path)
    states = [load_file(p) for p in disback.path]
    assert _equal(disback.fake.unet, states[3])  # the fake score already fits the initial generator
    assert not _equal(disback.true_teacher.unet, states[3])
    seen = []
    for step in range(0, 50):
        disback.begin_step(step)
        if not seen or seen[-1][0] != disback.target_index:
            seen.append((disback.target_index, {k: v.clone() for k, v in disback.teacher.unet.state_dict().items()}))
    assert [index for index, _ in seen] == [2, 1, 0]  # first the checkpoint nearest G_0, last the teacher
    for (_, weights), (_, before) in zip(seen[1:], seen, strict=False):
        assert any(not torch.equal(weights[k], before[k]) for k in weights)  # the switch changed the weights
    assert _equal(disback.teacher.unet, states[0])
    assert disback.teacher.unet is not disback.true_teacher.unet
    fresh = _disback(tmp_path)  # a resumed run lands on the same target from the step alone
    fresh.begin_step(15)
    assert fresh.target_index == 1 and _equal(fresh.teacher.unet, states[1])


def test_losses_use_the_moving_target(tmp_path):
    disback = _disback(tmp_path)
    disback.begin_step(0)
    calls = []
    target_forward = disback.teacher.unet.forward
    disback.teacher.unet.forward = lambda *a, **k: calls.append(1) or target_forward(*a, **k)
    disback.generator_loss(disback.generator).loss.backward()
    assert calls  # the DM gradient's real score is the path target, not the frozen true teacher


def test_path_is_reused_and_settings_are_checked(tmp_path):
    _disback(tmp_path)
    stamp = (tmp_path / "path" / "checkpoint_03.safetensors").stat().st_mtime_ns
    _disback(tmp_path)
    assert (tmp_path / "path" / "checkpoint_03.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        _disback(tmp_path, num_checkpoints=2)


def test_strict_loading_refuses_a_mismatched_checkpoint(tmp_path):
    disback = _disback(tmp_path)
    other = tiny_unet(num_classes=5)  # another class-embedding table
    with pytest.raises(RuntimeError):
        load_strict(other, disback.path[1])


def test_sid_base(tmp_path):
    from onestep.training.trainer import Trainer, TrainerConfig

    disback = _disback(tmp_path, "disback_sid", DisBackSiDOptions)
    assert _equal(disback.fake.unet, load_file(disback.path[-1]))
    true_teacher = {k: v.clone() for k, v in disback.true_teacher.unet.state_dict().items()}
    disback.begin_step(0)
    grads = teacher_input_grads(disback.teacher.unet,
                                lambda: disback.generator_loss(disback.generator).loss.backward())
    assert len(grads) == 1 and grads[0].abs().sum() > 0  # SiD differentiates through the path target
    Trainer(disback, tmp_path / "run", TrainerConfig(max_steps=2, checkpoint_every=0)).train()
    assert _equal(disback.true_teacher.unet, true_teacher)  # training never writes into the teacher ...
    assert _equal(disback.teacher.unet, load_file(disback.path[2]))  # ... nor into the path target it reads


def _fake_run(folder, method, fds, path_steps=None):
    import json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method}))
    history = [{"step": 100 * (i + 1), "fd_digits/student": v, "images_per_s/student": 500.0}
               for i, v in enumerate(fds)]
    (folder / "metrics.json").write_text(json.dumps({"history": history}))
    if path_steps is not None:
        (folder / "path").mkdir()
        (folder / "path" / "path.json").write_text(json.dumps({"steps": path_steps}))
    return folder


def test_convergence_counts_stage_one_and_finds_the_first_step_at_target(tmp_path):
    from onestep.bench.convergence import convergence_report
    from onestep.errors import UserInputError

    runs = [_fake_run(tmp_path / "b0", "dmd2", [9, 6, 4, 3]), _fake_run(tmp_path / "b1", "dmd2", [9, 6, 4, 5]),
            _fake_run(tmp_path / "d0", "disback", [7, 4, 3, 2], path_steps=50),
            _fake_run(tmp_path / "d1", "disback", [7, 3, 5, 2], path_steps=50)]
    report = convergence_report(runs, "dmd2")
    assert report["target_fd"] == 4.0  # mean of the baseline's finals 3 and 5
    disback, base = report["methods"]["disback"], report["methods"]["dmd2"]
    assert disback["fd_mean"] == [7, 3.5, 4, 2] and disback["steps_to_target"] == 200 + 50
    assert disback["share_of_baseline_steps"] == pytest.approx(250 / 400)
    assert base["steps_to_target"] == 300 and base["stage_one_steps"] == 0
    _fake_run(tmp_path / "odd", "dmd2", [9, 6])
    with pytest.raises(UserInputError, match="different steps"):
        convergence_report([*runs, tmp_path / "odd"], "dmd2")


def test_path_is_recorded_from_the_generator_that_init_generator_loaded(tmp_path):
    from onestep.distillers.disback import PATH_INDEX, weights_digest
    from onestep.export.pipeline import export_generator
    from onestep.models.generator import Generator

    teacher = Teacher(tiny_unet(num_classes=3), scheduler())
    stage1 = Generator.from_teacher(teacher.unet, teacher.schedule, [400])
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.2 * torch.randn_like(p))  # stand-in for an earlier stage's training
    export_generator(stage1, teacher, tmp_path / "stage1")

    def build(path_dir, **kwargs):
        torch.manual_seed(0)  # the same noise for both paths: only the starting generator differs
        return build_distiller("disback", teacher, _options(), batch_size=4, path_dir=path_dir, **kwargs)

    loaded = build(tmp_path / "loaded", init_generator=tmp_path / "stage1")
    plain = build(tmp_path / "plain")
    settings = json.loads((tmp_path / "loaded" / PATH_INDEX).read_text())["settings"]
    assert settings["generator_sha256"] == weights_digest(stage1.unet) != weights_digest(plain.generator.unet)
    # every recorded checkpoint fitted samples of the loaded generator, not of the teacher copy
    for mine, other in zip(loaded.path[1:], plain.path[1:], strict=True):
        mine, other = load_file(mine), load_file(other)
        assert any(not torch.equal(mine[k], other[k]) for k in mine)
    assert not _equal(loaded.fake.unet, load_file(plain.path[-1]))
    with pytest.raises(ValueError, match="other settings"):  # a path of another starting generator is never reused
        build(tmp_path / "loaded")
