"""The registry of distillers: a method name maps to its class and its options (presets are option defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onestep.distillers import stages
from onestep.distillers.base import Distiller
from onestep.distillers.boot import BOOT, BOOTOptions
from onestep.distillers.disback import Backtracking, DisBack, DisBackOptions, DisBackSiD, DisBackSiDOptions
from onestep.distillers.dmd import DMD, DMD1Options, DMDOptions
from onestep.distillers.msd import MSD, MSDOptions
from onestep.distillers.sfd import SFD, SFDOptions
from onestep.distillers.sid import SiD, SiDOptions
from onestep.distillers.sida import SiDA, SiDAOptions
from onestep.distillers.tsm import TeacherScoreMatching, TSMOptions


@dataclass(frozen=True)
class Registration:
    distiller_cls: type  # a Distiller, or a trainer task (tsm) built the same way
    options_cls: type


DISTILLERS: dict[str, Registration] = {
    "dmd": Registration(DMD, DMD1Options),
    "dmd2": Registration(DMD, DMDOptions),
    "sid": Registration(SiD, SiDOptions),
    "sida": Registration(SiDA, SiDAOptions),  # SiD²A: init_generator= a sid run (init_critic= to continue its critic)
    "sfd": Registration(SFD, SFDOptions),
    "msd": Registration(MSD, MSDOptions),
    "tsm": Registration(TeacherScoreMatching, TSMOptions),  # MSD's stage 0 for smaller students
    "disback": Registration(DisBack, DisBackOptions),
    "disback_sid": Registration(DisBackSiD, DisBackSiDOptions),
    "boot": Registration(BOOT, BOOTOptions),  # data-free, no critic
}


def build_distiller(name: str, teacher, options=None, init_generator: Path | None = None,
                    init_critic: Path | None = None, **kwargs) -> Distiller:
    """`build_distiller("dmd2", teacher, options)`: options default to the method's preset; kwargs go to the class
    (conditions, judge, real images, ...).

    A later stage starts its generator from an exported pipeline (`init_generator`) and its fake score from an
    earlier run's weights file (`init_critic`, see onestep.distillers.stages); both load before `finalize`, which
    records what depends on the starting generator (DisBack's path) and adds LoRA adapters.
    """
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; choose from {', '.join(sorted(DISTILLERS))}")
    reg = DISTILLERS[name]
    distiller = reg.distiller_cls(teacher, options if options is not None else reg.options_cls(), **kwargs)
    if not isinstance(distiller, Distiller):  # tsm is a task of its own: it trains a fresh network, never adapters
        if init_generator or init_critic:
            raise ValueError(f"init_generator and init_critic apply to distillers, not to method {name}")
        return distiller
    if init_generator:
        stages.init_generator(distiller.generator, Path(init_generator))
    if init_critic:
        if not hasattr(distiller, "fake") or isinstance(distiller, Backtracking):
            raise ValueError(f"init_critic: method {name} has no fake score to continue (DisBack's starts at the end "
                             "of its path)")
        stages.init_critic(distiller.fake, Path(init_critic))
    distiller.finalize()
    return distiller


__all__ = ["BOOTOptions", "DISTILLERS", "DMD1Options", "DMDOptions", "DisBackOptions", "DisBackSiDOptions",
           "Distiller", "MSDOptions", "SFDOptions", "SiDAOptions", "SiDOptions", "TSMOptions", "build_distiller"]
