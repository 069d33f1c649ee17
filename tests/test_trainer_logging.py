"""What a run reports: the launcher's mixed precision, trackers, progress toward the budget that ends first."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState

from onestep.errors import UserInputError
from onestep.training.progress import expected_total
from onestep.training.trainer import Trainer, TrainerConfig
from tests.test_trainer import TwoModelTask


class ImageTask(TwoModelTask):
    def sample_images(self):
        return torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).reshape(4, 3, 8, 8).remainder(256).to(torch.uint8)


@pytest.fixture
def fresh_accelerator_state(monkeypatch):
    """accelerate fixes the mixed precision once per process: these tests start and leave it fresh."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield monkeypatch
    AcceleratorState._reset_state(reset_partial_state=True)


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("launcher", "configured", "expected"),
                         [("bf16", None, "bf16"), (None, None, "no"), ("bf16", "no", "no")])
def test_mixed_precision_defaults_to_the_launchers(tmp_path, fresh_accelerator_state, launcher, configured, expected):
    if launcher:  # what `accelerate launch --mixed_precision bf16` sets for the processes it starts
        fresh_accelerator_state.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    trainer = Trainer(TwoModelTask(), tmp_path, TrainerConfig(max_steps=1, checkpoint_every=0,
                                                               mixed_precision=configured))
    assert trainer.accelerator.mixed_precision == expected
    trainer.train()
    assert _log(tmp_path)[0]["mixed_precision"] == expected


def test_tensorboard_tracker_gets_scalars_learning_rates_config_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_config = {"method": "demo", "train": {"max_steps": 6, "max_minutes": None}}
    cfg = TrainerConfig(max_steps=6, log_every=2, sample_every=3, checkpoint_every=0, report_to="tensorboard")
    Trainer(ImageTask(), tmp_path, cfg, run_config=run_config).train()
    events = EventAccumulator(str(tmp_path / "logs" / "onestep"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    jsonl = {r["step"]: r for r in _log(tmp_path) if "critic/loss" in r}
    critic = {e.step: e.value for e in events.Scalars("critic/loss")}
    assert sorted(critic) == sorted(jsonl) == [2, 4, 6]  # the same records as log.jsonl
    assert all(critic[s] == pytest.approx(jsonl[s]["critic/loss"], rel=1e-6) for s in critic)
    assert [e.value for e in events.Scalars("generator/lr")] == pytest.approx([1e-2] * 3)  # OptimizerConfig(lr=1e-2)
    assert "weight_norm" in tags["scalars"]  # the final evaluation
    assert [e.step for e in events.Images("samples")] == [3, 6, 6]  # sample_every and the final grid
    image = events.Images("samples")[0]
    from onestep.eval.grid import grid_array

    assert (image.height, image.width) == grid_array(ImageTask().sample_images()).shape[:2]
    hparams = list((tmp_path / "logs").rglob("hparams.yml"))
    assert hparams and "train.max_steps: 6" in hparams[0].read_text()


def test_every_evaluation_writes_a_grid(tmp_path):
    cfg = TrainerConfig(max_steps=5, eval_every=2, sample_every=0, checkpoint_every=0)
    Trainer(ImageTask(), tmp_path, cfg).train()
    assert sorted(p.name for p in tmp_path.glob("samples*.png")) == [
        "samples-0000002.png", "samples-0000004.png", "samples.png"]  # evals at 2 and 4, then the final grid


def test_unknown_or_missing_tracker_is_refused(tmp_path, monkeypatch):
    import onestep.training.tracking as tracking

    with pytest.raises(UserInputError, match="report_to must be one of none, tensorboard, wandb"):
        Trainer(TwoModelTask(), tmp_path, TrainerConfig(report_to="mlflow"))
    monkeypatch.setitem(tracking._AVAILABLE, "wandb", lambda: False)
    with pytest.raises(UserInputError, match="pip install wandb"):
        Trainer(TwoModelTask(), tmp_path, TrainerConfig(report_to="wandb"))


def test_expected_total_is_the_budget_that_ends_first():
    assert expected_total(0, 0.0, 100000, 10) == 100000  # nothing measured yet
    assert expected_total(50, 30.0, 100000, 10) == 1000  # 50 steps in 30 s: the 10-minute budget ends at 1000
    assert expected_total(50, 30.0, 600, 10) == 600  # the step budget ends first
    assert expected_total(50, 30.0, 100000, None) == 100000
    assert expected_total(50, 700.0, 100000, 10) == 50  # past the budget: this step is the last


def test_progress_in_a_log_file_is_a_few_lines_toward_the_time_budget(tmp_path, capfd):
    # stderr is captured (not a terminal): lines, not a redrawn bar; the time budget ends long before 100000 steps
    cfg = TrainerConfig(max_steps=100000, max_minutes=0.01, log_every=1, checkpoint_every=0, progress_every_s=0.2)
    Trainer(TwoModelTask(), tmp_path, cfg).train()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    steps = _log(tmp_path)[-1]["step"]
    assert "\r" not in err and 2 <= len(lines) <= 0.6 / 0.2 + 2  # one line per 0.2 s of a 0.6 s run, and the last
    assert f" 100% {steps}/{steps} " in lines[-1]  # ended at the budget: that step was the total
    assert len(set(lines)) == len(lines)  # no line printed twice
    assert all("/100000" not in line for line in lines[1:])


def test_progress_line_interval(tmp_path, capfd):
    Trainer(TwoModelTask(), tmp_path, TrainerConfig(max_steps=30, checkpoint_every=0, progress_every_s=3600)).train()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("train:")]
    assert len(lines) == 1 and " 100% 30/30 " in lines[0]


def test_progress_on_a_terminal_is_a_bar_toward_the_time_budget(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    cfg = TrainerConfig(max_steps=100000, max_minutes=0.005, log_every=1, checkpoint_every=0, progress_every_s=3600)
    Trainer(TwoModelTask(), tmp_path, cfg).train()
    steps = _log(tmp_path)[-1]["step"]
    redraws = terminal.getvalue().split("\r")
    assert len(redraws) > 2 and "\n" not in terminal.getvalue().rstrip("\n")  # redrawn in place, not lines
    assert "100%|" in redraws[-1] and f" {steps}/{steps} " in redraws[-1]
