"""Distillation (`method:` any registered distiller): a teacher, a one-step generator and its critics."""

from __future__ import annotations

from pathlib import Path

from onestep.errors import UserInputError
from onestep.files import read_json
from onestep.models.loading import resolve_path
from onestep.tasks.ingredients import (
    build_conditions,
    build_judge,
    build_real,
    check_writes_inside,
    data_source,
    load_teacher,
    use_attention,
)
from onestep.tasks.registry import RunSettings, TaskKind, register_task


def build_distiller_task(cfg: RunSettings):
    """A distiller with its teacher, the conditions and real images it draws and its judge."""
    from onestep.distillers import DISTILLERS, build_distiller
    from onestep.distillers.disback import Backtracking

    teacher = load_teacher(cfg)
    source = data_source(cfg, teacher)
    conditions = build_conditions(cfg, teacher, source)
    real = build_real(cfg, teacher, conditions, source)
    forget_prompts = list(getattr(cfg.options, "forget_prompts", []))
    forget = list(getattr(cfg.options, "forget", [])) if not forget_prompts else []
    judge = build_judge(cfg, teacher.num_classes, teacher.is_text, forget, conditions.prompts, forget_prompts)
    extra = {}
    if getattr(cfg.options, "override", None) == "classifier":
        from onestep.eval.classifier import load_digits_classifier

        extra["classifier"] = load_digits_classifier().to(teacher.device)  # pseudo-labels for SFD's override
    distiller_cls = DISTILLERS[cfg.method].distiller_cls
    if issubclass(distiller_cls, Backtracking):
        extra["path_dir"] = Path(cfg.output_dir) / "path"  # DisBack's stage-1 path, unless options.path_dir is set
        check_writes_inside(cfg, cfg.options.path_dir)
    init_generator = resolve_path(cfg.init_generator) if cfg.init_generator else None
    init_critic = critic_file(resolve_path(cfg.init_critic)) if cfg.init_critic else None
    try:
        distiller = build_distiller(cfg.method, teacher, cfg.options, conditions=conditions, judge=judge,
                                    batch_size=cfg.data.batch_size, real=real,
                                    regression_cache=Path(cfg.output_dir) / "cache",
                                    init_generator=init_generator, init_critic=init_critic, **extra)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    use_attention(distiller, cfg.attention)
    return distiller


def critic_file(run_dir: Path) -> Path:
    """The fake score's weights in a run folder's newest complete checkpoint (a later stage's `init_critic`).

    The trainer saves its updates' modules in order (accelerate's model.safetensors, model_1.safetensors, ...);
    every distiller with a fake score (DMD/DMD2, MSD, SiD, SFD, DisBack) lists the generator first, the critic second.
    """
    from onestep.distillers import DISTILLERS
    from onestep.distillers.dmd import DMD
    from onestep.distillers.sid import SiD
    from onestep.training.checkpoints import latest_checkpoint

    saved = run_dir / "config.json"
    if not saved.is_file():
        raise UserInputError(f"init_critic {run_dir} is not a onestep run folder (no config.json)")
    method = read_json(saved).get("method")
    if method not in DISTILLERS or not issubclass(DISTILLERS[method].distiller_cls, (DMD, SiD)):
        raise UserInputError(f"init_critic {run_dir}: a {method} run has no fake score to continue")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None or not (checkpoint / "model_1.safetensors").is_file():
        raise UserInputError(f"init_critic {run_dir} has no complete checkpoint")
    return checkpoint / "model_1.safetensors"


def _distillers() -> dict:
    from onestep.distillers import DISTILLERS

    return DISTILLERS


register_task(TaskKind("distillation", methods=_distillers, build=build_distiller_task,
                       options=lambda method: _distillers()[method].options_cls))
