"""onestep: distill pretrained diffusers UNets into one-step generators."""

from onestep.teacher import Teacher


__all__ = ["Teacher"]
__version__ = "0.1.0"
