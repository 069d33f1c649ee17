"""FSDP2 (`fully_shard`, accelerate `fsdp_version: 2`): what changes when the trained networks hold shards.

Under FSDP2 accelerate shards each prepared network in place: its parameters become DTensors holding this process's
shard, and its forward all-gathers them (accelerate's FSDP guide, "FSDP1 vs FSDP2"). The frozen teacher is not
prepared and stays a whole, plain module on every process. Three things then need care:
- EMA: the shadow copies are shards too; they update shard by shard, and a checkpoint stores them whole
  (`FullStateEMA`), so that it is independent of the number of processes, as accelerate's model files are not.
- Export: the exported pipeline needs whole weights; every process takes part in gathering them
  (`accelerator.get_state_dict`), and the main process loads them into a plain copy of the network kept from before
  sharding (`Skeleton`, no memory until then).
- Frozen calls of a trained network (`onestep.models.unet.call_frozen`) run through its own FSDP forward with
  `requires_grad` off (`onestep.models.networks.frozen_parameters`).
FSDP1 (flat parameters, a wrapper module) is refused: the unwrapped module would hold flat shards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel
from torch import nn


def clip_sharded_grad_norm_(accelerator, parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The norm of the whole gradient of sharded `parameters`, clipped to `max_norm` when set (torch's
    `clip_grad_norm_` reduces DTensor norms across the shards). Not accelerate's `clip_grad_norm_`: under FSDP 1.15
    first compares the parameter list with each prepared model's elementwise, which fails on DTensors."""
    from torch.distributed.tensor import DTensor

    accelerator.unscale_gradients()
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


def _like(whole: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """`whole` sharded as `live` is (each process keeps its own shard of the same whole tensor: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(live.device, live.dtype)
    if not isinstance(live, DTensor):
        return whole
    return distribute_tensor(whole, live.device_mesh, live.placements, src_data_rank=None)


class FullStateEMA(EMAModel):
    """diffusers' EMAModel whose checkpoint state holds whole tensors, whatever the parameters' sharding.

    Over FSDP2 shards, the shadow parameters are shards and every process updates its own (`step` is elementwise);
    `state_dict` gathers them (every process must call it: accelerate's `save_state` does) and `load_state_dict`
    shards them again like the live parameters. Over plain tensors it is EMAModel.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], **kwargs):
        super().__init__(parameters, **kwargs)
        self._live = list(parameters)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shadow_params"] = [_whole(p) for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.shadow_params = [_like(p, live) for p, live in zip(self.shadow_params, self._live, strict=True)]


class Skeleton:
    """A copy of a network's structure taken before it is sharded, with its parameters on the meta device (no
    memory); `materialize(state)` loads a whole state dict into it (the main process, at export)."""

    def __init__(self, module: nn.Module):
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in module.parameters()}
        self.module = copy.deepcopy(module, memo)  # buffers are copied: FSDP2 leaves them whole

    def materialize(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.module.load_state_dict(state, strict=True, assign=True)
        return self.module


@contextlib.contextmanager
def swapped_attributes(obj: object, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Inside the block, `obj`'s attributes that hold a module of `replacements` (keyed by id) hold its replacement."""
    swapped = {name: value for name, value in vars(obj).items() if id(value) in replacements}
    for name, value in swapped.items():
        setattr(obj, name, replacements[id(value)])
    try:
        yield
    finally:
        for name, value in swapped.items():
            setattr(obj, name, value)


def shared_with_frozen(trained: list[nn.Module], frozen: list[nn.Module]) -> bool:
    """Whether a trained network holds a tensor of a frozen one (a LoRA base shared with the teacher): sharding the
    trained network would shard the teacher's weights."""
    held = {id(p) for module in frozen for p in module.parameters()}
    return any(id(p) in held for module in trained for p in module.parameters())
