"""onestep: distill pretrained diffusers UNets into one-step generators.

The public names load on first use (PEP 562), so `import onestep` (and the CLI's start) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from onestep.distillers import build_distiller
    from onestep.models.teacher import Teacher
    from onestep.training.trainer import Trainer, TrainerConfig

_PUBLIC = {"Teacher": "onestep.models.teacher", "build_distiller": "onestep.distillers",
           "Trainer": "onestep.training.trainer", "TrainerConfig": "onestep.training.trainer"}

__all__ = ["Teacher", "Trainer", "TrainerConfig", "build_distiller"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onestep' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
