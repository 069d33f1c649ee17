"""onestep: distill pretrained diffusers UNets into one-step generators."""

from onestep.distillers import build_distiller
from onestep.models.teacher import Teacher
from onestep.training.trainer import Trainer, TrainerConfig


__all__ = ["Teacher", "Trainer", "TrainerConfig", "build_distiller"]
__version__ = "0.1.0"
