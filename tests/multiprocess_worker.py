"""Training runs for tests/test_multiprocess.py, run in one process or under `torch.distributed.run` (gloo, CPU).

`python -m tests.multiprocess_worker OUT` trains, in order:
  OUT/sid:  tiny SiD on a fixed data stream: every step's global batch is SHARES shares drawn from seeds that all
            processes share, and each process computes the shares it owns (`SharedBatch`). Two processes owning one
            share each must then end where one process owning both ends (DDP averages what one process averages).
  OUT/dmd2: tiny DMD2 with its GAN head, TTUR 2, a checkpoint at step 2 and a resumed second leg to step 4.
Each process writes OUT/<run>/rank_<i>.json (its first random number after the Trainer seeded it, its final weights'
checksum); the main process also writes OUT/<run>/weights.safetensors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.distillers.sid import SiDOptions
from onestep.models.teacher import Teacher
from onestep.training.trainer import Trainer, TrainerConfig, process_state
from onestep.training.updates import LossOutput, OptimizerConfig
from tests.conftest import scheduler, tiny_unet


SHARES, SHARE_BATCH, SID_STEPS = 2, 4, 3


class SharedBatch:
    """A task whose updates average their loss over the shares of a global batch this process owns; share s of the
    k-th call of update u draws its random numbers from seed (u, k, s), the same in every process."""

    def __init__(self, task, num_shares: int):
        state = process_state()
        self.task = task
        self.owned = [s for s in range(num_shares) if s % state.num_processes == state.process_index]
        self.num_shares = num_shares

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def updates(self):
        return [dataclasses.replace(u, loss=self._shared(u.loss, i)) for i, u in enumerate(self.task.updates())]

    def _shared(self, loss, update_index: int):
        calls = itertools.count()

        def shared_loss(module) -> LossOutput:
            call = next(calls)
            outs = []
            for share in self.owned:
                torch.manual_seed((update_index * 1000 + call) * self.num_shares + share)
                outs.append(loss(module))
            logs = {k: sum(o.logs[k] for o in outs) / len(outs) for k in outs[0].logs}
            return LossOutput(torch.stack([o.loss for o in outs]).mean(), logs)

        return shared_loss


def tiny_teacher() -> Teacher:
    return Teacher(tiny_unet(num_classes=3), scheduler())


def sid_task() -> SharedBatch:
    optimizer = OptimizerConfig(lr=1e-3, betas=(0.0, 0.999), grad_clip=10.0)
    options = SiDOptions(generator_optimizer=optimizer, critic_optimizer=optimizer, generator_ema=0.5)
    return SharedBatch(build_distiller("sid", tiny_teacher(), options, batch_size=SHARE_BATCH), SHARES)


def dmd2_task():
    torch.manual_seed(0)
    real = RealImages(torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,)))
    return build_distiller("dmd2", tiny_teacher(), DMDOptions(generator_every=2), real=real, batch_size=4)


def train(task, out: Path, max_steps: int, checkpoint_every: int = 0) -> Trainer:
    trainer = Trainer(task, out, TrainerConfig(max_steps=max_steps, log_every=1, checkpoint_every=checkpoint_every))
    report = {"first_random": torch.rand(()).item()}  # drawn right after the Trainer seeded this process
    trainer.train()
    weights = {f"{name}.{k}": v.detach().contiguous() for name, net in (("generator", task.generator),
                                                                         ("fake", task.fake))
               for k, v in net.state_dict().items()}
    report["checksum"] = sum(float(v.double().abs().sum()) for v in weights.values())
    (out / f"rank_{trainer.accelerator.process_index}.json").write_text(json.dumps(report))
    if trainer.accelerator.is_main_process:
        save_file(weights, out / "weights.safetensors")
    return trainer


def main(out: Path) -> None:
    train(sid_task(), out / "sid", SID_STEPS)
    train(dmd2_task(), out / "dmd2", 2, checkpoint_every=2)
    train(dmd2_task(), out / "dmd2", 4, checkpoint_every=2)  # resumes from step 2


if __name__ == "__main__":
    main(Path(sys.argv[1]))
