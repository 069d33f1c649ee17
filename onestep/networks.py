"""The networks a training task holds, whatever it names them: for placement on a device and attention backends."""

from __future__ import annotations

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
