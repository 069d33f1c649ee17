"""Resuming a run: the same run however its paths are written, the changes people make on a resume, `--overwrite`
that moves the old run aside, and what the console says."""

import json
import shutil
from pathlib import Path

import pytest

from onestep.cli import main
from onestep.config import load_config, to_dict
from onestep.errors import UserInputError
from onestep.models.loading import BUILTIN
from onestep.runs import RUN_CONFIG, check_output_dir


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits" / "dmd2.yaml"


def saved_run(out: Path, *overrides: str) -> None:
    """An output folder holding the run of DEMO with these overrides (its config.json and a checkpoint)."""
    (out / "checkpoints" / "checkpoint-0000003").mkdir(parents=True)
    (out / RUN_CONFIG).write_text(json.dumps(to_dict(load_config(DEMO, [f"output_dir={out}", *overrides]))))


def test_the_same_run_written_differently_resumes_and_allowed_changes_are_noted(tmp_path, monkeypatch, capsys):
    shutil.copytree(BUILTIN["builtin:digits"], tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    saved_run(out, "teacher.path=teacher")  # relative to the working folder
    check_output_dir(load_config(DEMO, [
        f"output_dir={out}", f"teacher.path={tmp_path / 'teacher'}",  # the same folder, written absolute
        "data.num_workers=0", "data.batch_size=16", "options.generator_optimizer.lr=3e-6",
        "train.max_steps=50", "train.max_minutes=5", "train.log_every=1", "eval.num_samples=10"]))
    err = capsys.readouterr().err
    assert "data.batch_size 64 -> 16" in err and "options.generator_optimizer.lr" in err
    shutil.copytree(tmp_path / "teacher", tmp_path / "copy")  # a byte-identical copy is the same teacher
    check_output_dir(load_config(DEMO, [f"output_dir={out}", "teacher.path=copy"]))


def test_a_different_run_is_refused_naming_the_keys(tmp_path, monkeypatch):
    shutil.copytree(BUILTIN["builtin:digits"], tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    saved_run(out, "teacher.path=teacher")
    weights = next((tmp_path / "teacher" / "unet").glob("*.safetensors"))
    shutil.copytree(tmp_path / "teacher", tmp_path / "other")
    data = bytearray((tmp_path / "other" / "unet" / weights.name).read_bytes())
    data[-1] ^= 1  # another teacher of the same size
    (tmp_path / "other" / "unet" / weights.name).write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=r"different run \(differs in options\.gan \(False -> True\); "
                                             r"teacher\.path \('teacher' -> 'other'\)\)"):
        check_output_dir(load_config(DEMO, [f"output_dir={out}", "teacher.path=other", "options.gan=true"]))
    assert (out / "checkpoints" / "checkpoint-0000003").is_dir()


def test_overwrite_moves_the_old_run_aside_and_says_where(tmp_path, capsys):
    out = tmp_path / "out"
    saved_run(out, "options.gan=true")
    (out / "latent").mkdir()
    check_output_dir(load_config(DEMO, [f"output_dir={out}"]), overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert not out.exists() and len(aside) == 1
    assert (aside[0] / "checkpoints" / "checkpoint-0000003").is_dir() and (aside[0] / "latent").is_dir()
    err = capsys.readouterr().err
    assert str(aside[0]) in err and str(out) in err
    check_output_dir(load_config(DEMO, [f"output_dir={out}"]), overwrite=True)  # nothing there: nothing moved
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]) == 1


def test_resume_is_announced_and_a_finished_run_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    small = [f"output_dir={out}", "eval.num_samples=10", "eval.sampling_batch=10", "data.batch_size=4",
             "train.log_every=1"]
    assert main(["train", str(DEMO), *small, "train.max_steps=1"]) == 0
    capsys.readouterr()
    # a longer budget and a new learning rate, as people change them on a resume
    assert main(["train", str(DEMO), *small, "train.max_steps=2", "options.critic_optimizer.lr=3e-6"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from step 1 of 2 in {out}" in err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["critic/lr"] for r in log if "critic/lr" in r][-1] == pytest.approx(3e-6)
    assert main(["train", str(DEMO), *small, "train.max_steps=2", "options.critic_optimizer.lr=3e-6"]) == 0
    captured = capsys.readouterr()
    assert "already reached its budget (train.max_steps=2) at step 2" in captured.err
    assert "2/2" not in captured.err and "resumed from" not in captured.err
    final = json.loads(captured.out.strip().splitlines()[-1])
    assert {k: v for k, v in final.items() if k != "output_dir"} == json.loads((out / "metrics.json").read_text())[
        "final"]
