"""SIGKILL at random moments: the newest checkpoint is always complete and loadable, and the resumed run ends on
exactly the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from onestep.training.checkpoints import latest_checkpoint
from onestep.training.trainer import Trainer, TrainerConfig
from tests.test_trainer import TwoModelTask


ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
SETTINGS = dict(max_steps=MAX_STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=1)

# The victim: the trainer test's two-model task, slowed a little so that kills land in every phase of a step
# (losses, optimizer steps, checkpoint writing), writing its final generator weights as safetensors.
VICTIM = f"""
import sys, time
from safetensors.torch import save_file
from tests.test_trainer import TwoModelTask
from onestep.training.trainer import Trainer, TrainerConfig
task = TwoModelTask()
updates, critic_loss = task.updates(), task._critic_loss
updates[1].loss = lambda critic: (time.sleep(0.01), critic_loss(critic))[1]
task.updates = lambda: updates
Trainer(task, sys.argv[1], TrainerConfig(**{SETTINGS!r})).train()
save_file({{"weight": task.exported}}, sys.argv[2])
"""


def _started(out: Path) -> bool:
    log = out / "log.jsonl"
    return log.is_file() and '"elapsed_s"' in log.read_text()


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    out, final = tmp_path / "run", tmp_path / "final.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills, resumed_from = 0, []
    while not final.exists():
        proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(out), str(final)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            deadline = time.time() + 60
            while not _started(out) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
        newest = latest_checkpoint(out / "checkpoints")
        if newest is not None:  # complete, and loadable by a fresh trainer
            probe = Trainer(TwoModelTask(), out, TrainerConfig(**SETTINGS))
            assert probe.resume()
            resumed_from.append(probe.step)
    assert kills == 4
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] == MAX_STEPS  # never went backwards

    straight = TwoModelTask()
    Trainer(straight, tmp_path / "straight", TrainerConfig(**SETTINGS)).train()
    assert torch.equal(load_file(final)["weight"], straight.exported)
