"""The training loop: cadence of several updates, checkpoints that are atomic and pruned, exact resume."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from onestep.errors import UserInputError
from onestep.training.checkpoints import complete_checkpoints, damage, latest_checkpoint
from onestep.training.trainer import Trainer, TrainerConfig
from onestep.training.updates import LossOutput, OptimizerConfig, Update


class TwoModelTask:
    """A 'critic' every step and a 'generator' every 3rd, each a linear layer on random data."""

    def __init__(self):
        torch.manual_seed(0)
        self.gen, self.critic = nn.Linear(4, 4), nn.Linear(4, 1)
        self.calls = {"generator": [], "critic": []}
        self.step = 0
        self.exported = None

    def updates(self):
        opt = OptimizerConfig(lr=1e-2, grad_clip=1.0)
        return [Update("generator", self.gen, self._gen_loss, opt, every=3, ema_decay=0.9),
                Update("critic", self.critic, self._critic_loss, opt)]

    def _gen_loss(self, gen):
        self.calls["generator"].append(1)
        return LossOutput(gen(torch.randn(8, 4)).square().mean())

    def _critic_loss(self, critic):
        self.calls["critic"].append(1)
        x = self.gen(torch.randn(8, 4)).detach()
        return LossOutput((critic(x) - 1).square().mean(), {"mean": float(x.mean())})

    def evaluate(self):
        return {"weight_norm": float(self.gen.weight.detach().norm())}

    def sample_images(self):
        return None

    def export_pipeline(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.exported = self.gen.weight.detach().clone()


def _train(tmp_path, max_steps, **kwargs):
    task = TwoModelTask()
    cfg = TrainerConfig(max_steps=max_steps, log_every=1, checkpoint_every=kwargs.pop("checkpoint_every", 4),
                        keep_checkpoints=kwargs.pop("keep", 2), **kwargs)
    Trainer(task, tmp_path, cfg).train()
    return task


def test_update_cadence_and_outputs(tmp_path):
    task = _train(tmp_path, 9)
    assert len(task.calls["critic"]) == 9 and len(task.calls["generator"]) == 3  # steps 0, 3, 6
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 9 and "weight_norm" in metrics["final"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("critic/loss" in r and "generator/grad_norm" in r for r in log)


def test_checkpoints_are_pruned_and_complete(tmp_path):
    _train(tmp_path, 13, checkpoint_every=4, keep=2)
    names = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["checkpoint-0000012", "checkpoint-0000013"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    _train(tmp_path, 4, checkpoint_every=4)
    half = tmp_path / "checkpoints" / "checkpoint-0000008"
    half.mkdir()  # a crash mid-save: no marker file
    assert latest_checkpoint(tmp_path / "checkpoints").name == "checkpoint-0000004"


def test_resume_gives_identical_weights(tmp_path):
    straight = _train(tmp_path / "a", 10, checkpoint_every=0)
    _train(tmp_path / "b", 5, checkpoint_every=0)  # stops at 5 with a final checkpoint
    resumed = _train(tmp_path / "b", 10, checkpoint_every=0)
    assert len(resumed.calls["critic"]) == 5  # it continued, it did not start over
    assert torch.equal(straight.gen.weight, resumed.gen.weight)
    assert torch.equal(straight.critic.weight, resumed.critic.weight)
    assert torch.equal(straight.exported, resumed.exported)  # EMA state resumed too


@pytest.mark.parametrize("kind", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_named_and_passed_over(tmp_path, capsys, kind):
    straight = _train(tmp_path / "straight", 12, checkpoint_every=4)
    _train(tmp_path / "run", 8, checkpoint_every=4)  # checkpoints 4 and 8
    shard = tmp_path / "run" / "checkpoints" / "checkpoint-0000008" / "model_1.safetensors"
    size = shard.stat().st_size
    if kind == "truncated":
        os.truncate(shard, size // 2)
    else:
        shard.unlink()
    capsys.readouterr()
    resumed = _train(tmp_path / "run", 12, checkpoint_every=4)
    what = f"model_1.safetensors is {size // 2} bytes, {size} were written" if kind == "truncated" else \
        "model_1.safetensors missing"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("onestep:")]
    assert lines[0] == f"onestep: checkpoint {shard.parent} is damaged ({what}); passed over"
    assert lines[1:] == [f"onestep: resumed from step 4 of 12 in {shard.parent.parent.parent}"]
    assert len(resumed.calls["critic"]) == 8  # from step 4
    assert torch.equal(straight.exported, resumed.exported)
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == \
        ["checkpoint-0000008", "checkpoint-0000012"]  # the damaged one was written again
    assert damage(shard.parent) is None


def test_a_checkpoint_without_the_states_a_run_keeps_is_refused_in_one_line(tmp_path):
    _train(tmp_path, 2, checkpoint_every=2)  # no data stream to keep
    task = TwoModelTask()
    task.checkpointed = lambda: [nn.Linear(1, 1)]  # now one: its state is not in the checkpoint
    with pytest.raises(UserInputError, match="holds another set of states than this run keeps"):
        Trainer(task, tmp_path, TrainerConfig(max_steps=4)).train()


def test_metrics_history_survives_a_resume(tmp_path):
    _train(tmp_path, 6, eval_every=2)  # evaluations at 2 and 4, the final one at 6, a checkpoint at 4 and 6
    _train(tmp_path, 10, eval_every=2)  # resumes at 6: evaluations at 8 and the final 10
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [record["step"] for record in history] == [2, 4, 6, 8, 10]


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    task = TwoModelTask()
    calls = {"n": 0}

    def sometimes_nan(critic):
        calls["n"] += 1
        loss = (critic(torch.randn(8, 4)) - 1).square().mean()
        return LossOutput(loss * float("nan") if calls["n"] in (2, 3) else loss)

    updates = task.updates()
    updates[1].loss = sometimes_nan
    task.updates = lambda: updates
    before = None
    trainer = Trainer(task, tmp_path, TrainerConfig(max_steps=5, checkpoint_every=0))
    before = [p.detach().clone() for p in task.critic.parameters()]
    trainer.train()
    assert trainer.nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in task.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, task.critic.parameters(), strict=True))


def _signalled_task(signals: int) -> TwoModelTask:
    """A task that sends itself `signals` SIGTERMs during its 7th step's critic loss."""
    import os
    import signal

    task = TwoModelTask()
    original = task._critic_loss

    def critic_then_signal(critic):
        if len(task.calls["critic"]) == 6:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step finishes first
        return original(critic)

    updates = task.updates()
    updates[1].loss = critic_then_signal
    task.updates = lambda: updates
    return task


def test_sigterm_saves_a_checkpoint_exports_and_exits_cleanly(tmp_path):
    import signal

    task = _signalled_task(1)
    before = signal.getsignal(signal.SIGTERM)
    result = Trainer(task, tmp_path, TrainerConfig(max_steps=100, checkpoint_every=0)).train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-0000007"
    assert result == {"interrupted": "SIGTERM", "step": 7, "checkpoint": str(checkpoint),
                      "pipeline": str(tmp_path / "pipeline")}
    assert latest_checkpoint(tmp_path / "checkpoints") == checkpoint
    assert task.exported is not None  # the export ran, as at a normal end
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    resumed = _train(tmp_path, 10, checkpoint_every=0)
    assert len(resumed.calls["critic"]) == 3  # continued from step 7


def test_sigterm_without_time_left_skips_the_export_and_says_why(tmp_path):
    task = _signalled_task(1)
    result = Trainer(task, tmp_path, TrainerConfig(max_steps=100, checkpoint_every=0, stop_grace_s=0)).train()
    assert result["step"] == 7 and "pipeline" not in result and task.exported is None
    assert result["export_skipped"] == "0 s of the 0 s grace period left after the checkpoint (train.stop_grace_s)"


def test_a_second_signal_stops_at_once(tmp_path):
    import pytest

    from onestep.training.trainer import StoppedAtOnce

    _train(tmp_path, 4, checkpoint_every=4)
    task = _signalled_task(2)
    # resumed at step 4, the signals come in the 7th critic loss, that is, inside step 10
    with pytest.raises(StoppedAtOnce, match="second SIGTERM at step 10; the last complete checkpoint is .*0000004"):
        Trainer(task, tmp_path, TrainerConfig(max_steps=100, checkpoint_every=0)).train()
    assert task.exported is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-0000004"]


def test_disk_full_mid_checkpoint_keeps_the_last_complete_one(tmp_path, monkeypatch):
    import errno

    import pytest
    from accelerate import Accelerator

    from onestep.errors import UserInputError

    _train(tmp_path, 4, checkpoint_every=4)
    before = latest_checkpoint(tmp_path / "checkpoints")
    saved = Accelerator.save_state

    def fill_disk(self, output_dir, **kwargs):
        saved(self, output_dir, **kwargs)  # most of the state is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", fill_disk)
    with pytest.raises(UserInputError, match="No space left on device.*checkpoint-0000004.*intact"):
        _train(tmp_path, 8, checkpoint_every=4)
    assert latest_checkpoint(tmp_path / "checkpoints") == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [before.name]  # no half-written folder
    monkeypatch.setattr(Accelerator, "save_state", saved)
    assert len(_train(tmp_path, 8, checkpoint_every=4).calls["critic"]) == 4  # resumes from step 4


def test_nan_weights_are_never_written(tmp_path):
    import pytest

    task = TwoModelTask()
    trainer = Trainer(task, tmp_path, TrainerConfig(max_steps=2, checkpoint_every=1))
    trainer.train()
    newest = latest_checkpoint(tmp_path / "checkpoints")
    with torch.no_grad():
        task.critic.weight[0, 0] = float("nan")
    trainer.counter.step += 1
    with pytest.raises(FloatingPointError, match="not saved"):
        trainer._checkpoint()
    assert latest_checkpoint(tmp_path / "checkpoints") == newest


class StreamTask:
    """A generator every 2nd step (with EMA) and a critic every step, each reading the next rows of a fixed stream:
    k micro-batches of b rows are the same rows as one batch of k*b."""

    def __init__(self, batch_size: int):
        torch.manual_seed(0)
        self.gen, self.critic = nn.Linear(4, 4), nn.Linear(4, 1)
        self.data = torch.randn(1000, 4)
        self.batch_size, self.position = batch_size, {"generator": 0, "critic": 0}
        self.calls = {"generator": 0, "critic": 0}

    def _rows(self, name):
        start = self.position[name]
        self.position[name] += self.batch_size
        self.calls[name] += 1
        return self.data[start:start + self.batch_size]

    def updates(self):
        opt = OptimizerConfig(lr=1e-2, grad_clip=None)
        return [Update("generator", self.gen, lambda g: LossOutput((g(self._rows("generator")) - 1).square().mean()),
                       opt, every=2, ema_decay=0.5),
                Update("critic", self.critic, lambda c: LossOutput(c(self._rows("critic")).square().mean()), opt)]

    def evaluate(self):
        return {}

    def sample_images(self):
        return None

    def export_pipeline(self, out_dir: Path):
        pass


def _accumulated(tmp_path, batch_size, k, steps=6):
    task = StreamTask(batch_size)
    trainer = Trainer(task, tmp_path, TrainerConfig(max_steps=steps, log_every=1, checkpoint_every=0,
                                                    gradient_accumulation_steps=k))
    trainer.train()
    return task, trainer


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """k micro-batches of b: the same AdamW steps as one batch of k*b; TTUR and EMA count optimizer steps."""
    big, big_trainer = _accumulated(tmp_path / "big", 12, 1)
    small, small_trainer = _accumulated(tmp_path / "small", 4, 3)
    for a, b in ((big.gen, small.gen), (big.critic, small.critic)):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert small.calls == {"generator": 3 * 3, "critic": 3 * 6}  # 3 generator and 6 critic optimizer steps
    ema_big, ema_small = big_trainer.emas["generator"][0], small_trainer.emas["generator"][0]
    assert ema_small.optimization_step == ema_big.optimization_step == 3
    for pa, pb in zip(ema_big.shadow_params, ema_small.shadow_params, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big.gen.weight, StreamTask(12).gen.weight)  # it trained
    # AdamW hides a gradient's scale: the logged loss and gradient norm show the micro-batches are averaged, not summed
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("big", "small")]
    keys = ("generator/loss", "generator/grad_norm", "critic/loss", "critic/grad_norm")
    for a, b in zip(*logs, strict=True):
        for key in keys:
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), key


class DecayingTask(TwoModelTask):
    """TwoModelTask with the generator's learning rate on a diffusers schedule."""

    def __init__(self, **schedule):
        super().__init__()
        self.schedule = schedule

    def updates(self):
        generator, critic = super().updates()
        generator.optimizer = OptimizerConfig(lr=1e-2, grad_clip=1.0, **self.schedule)
        return [generator, critic]


def test_lr_decay_follows_the_diffusers_schedule_and_resumes(tmp_path):
    def train(out, steps, **schedule):
        task = DecayingTask(**schedule)
        Trainer(task, out, TrainerConfig(max_steps=steps, log_every=1, checkpoint_every=0)).train()
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        # a record carries the last value of each update's logs: records 1, 4, 7, ... follow a generator step, whose
        # logged lr is the one that step used
        return task, [r["generator/lr"] for r in log if "generator/lr" in r and r["step"] % 3 == 1]

    # generator steps at iterations 0, 3, 6, 9, 12; its schedule advances every iteration (as DMD2's): linear to 0
    # over 12 iterations, then held at 0
    _, lrs = train(tmp_path / "linear", 13, lr_scheduler="linear", lr_decay_steps=12)
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    # warm-up over 3 iterations (one generator step, not three), then half a cosine over the next 12 iterations
    _, lrs = train(tmp_path / "warm", 13, lr_scheduler="cosine", lr_decay_steps=15, warmup_steps=3)
    assert lrs == pytest.approx([0.0] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    _, lrs = train(tmp_path / "warmup_only", 13, warmup_steps=6)  # constant_with_warmup, DMD2's
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2, 1e-2])
    _, lrs = train(tmp_path / "constant", 7)
    assert lrs == [1e-2] * 3
    straight, _ = train(tmp_path / "a", 13, lr_scheduler="linear", lr_decay_steps=12)
    train(tmp_path / "b", 5, lr_scheduler="linear", lr_decay_steps=12)
    resumed, lrs = train(tmp_path / "b", 13, lr_scheduler="linear", lr_decay_steps=12)
    assert torch.equal(straight.gen.weight, resumed.gen.weight) and lrs[-1] == 0.0
    for bad, match in (({"lr_scheduler": "exponential"}, "lr_scheduler must be one of"),
                       ({"lr_scheduler": "linear"}, "needs lr_decay_steps")):
        with pytest.raises(UserInputError, match=match):
            train(tmp_path / "bad", 3, **bad)
