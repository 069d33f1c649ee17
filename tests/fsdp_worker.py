"""The same tiny runs under DDP and under FSDP2, for tests/test_fsdp.py: `torch.distributed.run --nproc_per_node 2
-m tests.fsdp_worker OUT` (gloo, CPU) trains, in each of OUT/ddp and OUT/fsdp:
  dmd2: DMD2 with its GAN head (a frozen call of the critic in the generator loss) and a generator EMA, 4 steps
        (under FSDP: a checkpoint at step 2 and a resumed second leg to step 4), then the export;
  sid:  SiD with LoRA on generator and critic (frozen base and trained adapters in the same shards; frozen calls
        of the fake score in the generator loss, checkpointed), 2 steps, exported merged.
The main process writes each run's final whole weights (`accelerator.get_state_dict`) to weights.safetensors, and
frozen.json: whether a generator loss's backward pass gave any / every trained parameter of each network a gradient.

accelerate 1.15 selects FSDP only on accelerators (AcceleratorState turns MULTI_GPU, MULTI_XPU, ... into FSDP, never
MULTI_CPU), so on the CPU `use_fsdp2` sets the process state to FSDP2 itself. Everything after that is accelerate's
and torch's own FSDP2 code on gloo: `fully_shard` of each prepared network, its sharded checkpoints (DCP),
`get_state_dict`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.data.conditions import RealImages
from onestep.distillers import build_distiller
from onestep.distillers.dmd import DMDOptions
from onestep.distillers.sid import SiDOptions
from onestep.models.lora import LoRAConfig
from onestep.training.trainer import Trainer, TrainerConfig
from onestep.training.updates import OptimizerConfig
from tests.multiprocess_worker import tiny_teacher


def use_fsdp2() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator()  # the process state, as the launcher set it up (MULTI_CPU)
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["ResnetBlock2D"],
        state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# AdamW with a large eps: its first steps are otherwise sign(gradient) x lr, and SiD's first generator gradient is
# float noise (the fake score starts as the teacher), whose signs depend on the order of the gradient reduction
OPTIMIZER = OptimizerConfig(lr=1e-3, betas=(0.0, 0.999), eps=1e-2, grad_clip=10.0)


def dmd2_task():
    torch.manual_seed(0)
    real = RealImages(torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,)))
    options = DMDOptions(generator_every=2, generator_ema=0.5, generator_optimizer=OPTIMIZER)
    return build_distiller("dmd2", tiny_teacher(), options, real=real, batch_size=4)


def sid_task():
    options = SiDOptions(generator_optimizer=OPTIMIZER, critic_optimizer=OPTIMIZER, generator_ema=None,
                         gradient_checkpointing=True, lora=LoRAConfig(rank=2, critic=True, share_base=False))
    return build_distiller("sid", tiny_teacher(), options, batch_size=4)


def train(task, out: Path, max_steps: int, checkpoint_every: int = 0) -> None:
    trainer = Trainer(task, out, TrainerConfig(max_steps=max_steps, log_every=1, checkpoint_every=checkpoint_every))
    trainer.train()
    weights = {f"{name}.{k}": v.contiguous() for name, module in trainer.modules.items()
               for k, v in trainer.accelerator.get_state_dict(module).items()}
    generator = trainer.modules["generator"]
    generator_loss = next(u.loss for u in trainer.updates if u.name == "generator")
    generator_loss(generator).loss.backward()
    frozen = {name: [p.grad is not None for p in module.parameters() if p.requires_grad]
              for name, module in trainer.modules.items()}
    if trainer.accelerator.is_main_process:
        save_file(weights, out / "weights.safetensors")
        (out / "frozen.json").write_text(json.dumps({k: [any(v), all(v)] for k, v in frozen.items()}))


def main(out: Path) -> None:
    for backend in ("ddp", "fsdp"):
        if backend == "fsdp":
            use_fsdp2()
        # FSDP: to step 2, then resumed from its checkpoint to step 4; DDP straight to step 4 (a resumed run
        # continues exactly: tests/test_dmd.py)
        for steps in (2, 4) if backend == "fsdp" else (4,):
            train(dmd2_task(), out / backend / "dmd2", steps, checkpoint_every=2)
        train(sid_task(), out / backend / "sid", 2)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
