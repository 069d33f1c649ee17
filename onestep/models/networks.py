"""The networks a training task holds, whatever it names them (placement on a device, attention backends), and
whether a network is sharded by FSDP2 (frozen calls run through its own forward then)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def reachable_modules(obj: object) -> list[nn.Module]:
    """The networks an object holds, directly or through onestep objects, lists and dicts (a distiller's teacher,
    generator and critics, DisBack's moving target, a regression's teacher): each task names its networks its way."""
    if isinstance(obj, nn.Module):
        return [obj]
    found, seen = [], {id(obj)}
    todo = list(vars(obj).values())  # the task's own class may be defined anywhere
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif type(item).__module__.startswith("onestep."):
            todo.extend(getattr(item, "__dict__", {}).values())
    return found


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded by FSDP2's `fully_shard` (it is then an `FSDPModule` in place)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """`requires_grad` off for `module`'s parameters inside the block, restored after. FSDP2 gives the gathered
    parameters of a forward the `requires_grad` of their shards, so a forward run inside records no graph to them:
    no gradient reaches them and no reduce-scatter runs for them."""
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)
