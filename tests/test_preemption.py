"""A preempted run (SLURM: SIGTERM, then SIGKILL after its grace period) through the real `onestep train`: it
finishes its step, checkpoints, exports and exits 0 with one line saying how to resume; a second signal stops it at
once and leaves nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onestep.training.checkpoints import verified_checkpoint


ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits/dmd2.yaml"


def start(out: Path, *overrides: str) -> subprocess.Popen:
    args = [f"output_dir={out}", "train.max_steps=100000", "train.max_minutes=null", "train.checkpoint_every=100000",
            "train.log_every=1", "data.batch_size=8", "eval.num_samples=16", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "onestep.cli", "train", CONFIG, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.jsonl"
        if log.is_file() and any(json.loads(line).get("step", 0) >= step and "elapsed_s" in line
                                 for line in log.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} logged: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.name.startswith(".") and (p.name.endswith((".tmp", ".old"))
                                                                        or p.name.startswith((".tmp-", ".old-")))]


@pytest.mark.slow
def test_sigterm_checkpoints_exports_and_says_how_to_resume_then_a_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_step(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    step = result["step"]
    lines = [line for line in stderr.splitlines() if line.startswith("onestep train:")]
    assert lines == [f"onestep train: stopped by SIGTERM at step {step}: checkpoint {out}/checkpoints/"
                     f"checkpoint-{step:07d}, pipeline {out}/pipeline; resume with: onestep train {CONFIG} "
                     f"output_dir={out} " + lines[0].split(f"output_dir={out} ", 1)[1]]
    assert verified_checkpoint(out / "checkpoints") == (out / "checkpoints" / f"checkpoint-{step:07d}", [])
    index = out / "pipeline" / "model_index.json"
    assert json.loads(index.read_text())["_class_name"] == "OneStepPipeline"
    assert (out / "pipeline" / "README.md").is_file() and not (out / "metrics.json").exists()

    # the same command resumes; two signals in a row: the second one ends it at once, mid-step
    exported = index.stat().st_mtime_ns
    proc = start(out)
    wait_for_step(out, proc, step + 2)
    proc.send_signal(signal.SIGTERM)
    # the second signal lands while the first one's checkpoint is being written (two signals sent at once would
    # arrive as one, and a fixed pause can outlast a small run's checkpoint and export)
    deadline = time.monotonic() + 60
    while not any((out / "checkpoints").glob(".tmp-checkpoint-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the first SIGTERM started no checkpoint"
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15  # no step, checkpoint or export is finished first (the machine is shared)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("onestep train: stopped at once by a second SIGTERM at step")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"step": step, "event": "resumed"}.items() <= [r for r in log if r.get("event") == "resumed"][0].items()
    assert verified_checkpoint(out / "checkpoints") == (out / "checkpoints" / f"checkpoint-{step:07d}", [])
    assert index.stat().st_mtime_ns == exported and leftovers(out) == []
