"""scripts/checkpoint_curve.py: a run's kept checkpoints re-judged reproduce the run's own evaluations at those steps
(one trainer resumed from each checkpoint in turn), and bad input is one line."""

import json
from pathlib import Path

import pytest

from onestep.cli import main as onestep
from scripts.checkpoint_curve import main as curve


DEMO = Path(__file__).resolve().parents[1] / "configs" / "digits" / "dmd2.yaml"


def test_checkpoints_rejudged_equal_the_runs_own_evaluations(tmp_path, capsys):
    run = tmp_path / "run"
    assert onestep(["train", str(DEMO), f"output_dir={run}", "train.max_steps=4", "train.max_minutes=null",
                    "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                    "eval.num_samples=20", "data.batch_size=4", "options.generator_every=1"]) == 0
    own = {r["step"]: r["fd_digits/student"] for r in json.loads((run / "metrics.json").read_text())["history"]}
    capsys.readouterr()
    assert curve([str(run), "--out", str(tmp_path / "curve.json")]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    history = json.loads((tmp_path / "curve.json").read_text())["history"]
    assert printed == history and [r["step"] for r in history] == [2, 4]
    assert own[2] != own[4]  # the generator moved between the two checkpoints
    for record in history:
        assert record["fd_digits/student"] == pytest.approx(own[record["step"]], rel=1e-5)


def test_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert curve([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
