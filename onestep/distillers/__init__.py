"""The registry of distillers: a method name maps to its class and its options (presets are option defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from onestep.distillers.base import Distiller
from onestep.distillers.boot import BOOT, BOOTOptions
from onestep.distillers.disback import DisBack, DisBackOptions, DisBackSiD, DisBackSiDOptions
from onestep.distillers.dmd import DMD, DMD1Options, DMDOptions
from onestep.distillers.msd import MSD, MSDOptions
from onestep.distillers.sfd import SFD, SFDOptions
from onestep.distillers.sid import SiD, SiDOptions
from onestep.distillers.tsm import TeacherScoreMatching, TSMOptions


@dataclass(frozen=True)
class Registration:
    distiller_cls: type  # a Distiller, or a trainer task (tsm) built the same way
    options_cls: type


DISTILLERS: dict[str, Registration] = {
    "dmd": Registration(DMD, DMD1Options),
    "dmd2": Registration(DMD, DMDOptions),
    "sid": Registration(SiD, SiDOptions),
    "sfd": Registration(SFD, SFDOptions),
    "msd": Registration(MSD, MSDOptions),
    "tsm": Registration(TeacherScoreMatching, TSMOptions),  # MSD's stage 0 for smaller students
    "disback": Registration(DisBack, DisBackOptions),
    "disback_sid": Registration(DisBackSiD, DisBackSiDOptions),
    "boot": Registration(BOOT, BOOTOptions),  # data-free, no critic
}


def build_distiller(name: str, teacher, options=None, **kwargs) -> Distiller:
    """`build_distiller("dmd2", teacher, options)`: options default to the method's preset; kwargs go to the class
    (conditions, judge, real images, ...)."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; choose from {', '.join(sorted(DISTILLERS))}")
    reg = DISTILLERS[name]
    distiller = reg.distiller_cls(teacher, options if options is not None else reg.options_cls(), **kwargs)
    if isinstance(distiller, Distiller):  # tsm is a task of its own: it trains a fresh network, never adapters
        distiller.use_lora()
    return distiller


__all__ = ["BOOTOptions", "DISTILLERS", "DMD1Options", "DMDOptions", "DisBackOptions", "DisBackSiDOptions",
           "Distiller", "MSDOptions", "SFDOptions", "SiDOptions", "TSMOptions", "build_distiller"]
