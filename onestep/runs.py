"""From a validated RunConfig to a running Trainer: the run folder (identity, resume, export) around the task that
the config's kind builds (onestep.tasks: which method, which teacher, which data, which judge)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from accelerate.utils import set_seed

from onestep.config import RunConfig, config_from, to_dict
from onestep.errors import UserInputError
from onestep.export.model_card import write_model_card
from onestep.files import read_json, write_json_atomic
from onestep.run_folder import identity_differences, move_aside, resume_notes
from onestep.tasks import task_kind
from onestep.tasks.distillation import build_distiller_task, critic_file  # noqa: F401  (also importable from here)
from onestep.tasks.ingredients import (  # noqa: F401  (also importable from here)
    build_conditions,
    build_judge,
    build_real,
    data_source,
    load_real_data,
    load_teacher,
    read_prompt_list,
    use_attention,
)
from onestep.training.checkpoints import checkpoint_at
from onestep.training.trainer import Trainer, process_state


RUN_CONFIG = "config.json"


def is_main_process() -> bool:
    """Whether this process writes the run's files: the only one, or the first of an `accelerate launch` / `torchrun`
    (the others compute the same run and must not race it on disk)."""
    return process_state().is_main_process


def with_current_defaults(saved: dict) -> dict:
    """A saved config.json as today's code reads it: settings added since it was written take their defaults, so
    that a run started by older code still resumes (as itself, not as a different run)."""
    try:
        return to_dict(config_from(saved, label=RUN_CONFIG))
    except UserInputError:
        return saved


def check_output_dir(cfg: RunConfig, overwrite: bool = False) -> None:
    """Refuse to resume into / overwrite an output folder that holds a different run, unless told to.

    With `overwrite` the run starts over in an empty folder: what the folder held is moved aside to a sibling folder
    (onestep.run_folder.move_aside), never deleted.
    """
    out = Path(cfg.output_dir)
    saved = out / RUN_CONFIG
    if overwrite:
        if is_main_process():
            move_aside(out)
        return
    if not out.exists():
        return
    if not saved.is_file():
        # a run killed while building its latent cache has left only that (config.json comes after the build)
        cache = Path(cfg.data.latent_cache).resolve() if cfg.data.latent_cache else None
        if any(entry.resolve() != cache for entry in out.iterdir()):
            raise UserInputError(f"output_dir {out} is not empty and holds no onestep run; pass --overwrite to move "
                                 "it aside")
        return
    try:
        previous = json.loads(saved.read_text())
    except ValueError:  # not JSON, not UTF-8
        raise UserInputError(f"output_dir {out} has a corrupt {RUN_CONFIG}; pass --overwrite to move it "
                             "aside") from None
    previous, current = with_current_defaults(previous), to_dict(cfg)
    changed = identity_differences(previous, current)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UserInputError(f"output_dir {out} belongs to a different run (differs in {shown}); choose another "
                             "output_dir or pass --overwrite (moves the old run aside)")
    if is_main_process():
        for note in resume_notes(previous, current):
            print(f"onestep: {note}", file=sys.stderr)


def train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Train a run to its end; an msd config without `options.student` trains every student, one after another."""
    if cfg.method == "msd" and cfg.options.student is None:
        return train_students(cfg, overwrite)
    return build_trainer(cfg, overwrite).train()


def student_config(cfg: RunConfig, k: int) -> RunConfig:
    """Student k's own run: OUTPUT_DIR/student_k, the same options with `student` = k.

    An `init_generator` / `init_critic` that is an earlier all-students msd run (a folder holding `student_k/`:
    stage 1 before the GAN stage) starts student k from that run's student k; any other (one single-student run on
    the whole condition set: MSD's warm start) starts every student from the same weights.
    """
    import copy

    sub = copy.deepcopy(cfg)
    sub.output_dir = str(Path(cfg.output_dir) / f"student_{k}")
    sub.options.student = k
    if cfg.init_generator and (Path(cfg.init_generator) / f"student_{k}").is_dir():
        sub.init_generator = str(Path(cfg.init_generator) / f"student_{k}" / "pipeline")
    if cfg.init_critic and (Path(cfg.init_critic) / f"student_{k}").is_dir():
        sub.init_critic = str(Path(cfg.init_critic) / f"student_{k}")
    return sub


def train_students(cfg: RunConfig, overwrite: bool = False) -> dict:
    """MSD's students one after another (each resumable in its own folder), then the assembled pipeline.

    `train.max_steps` / `train.max_minutes` apply to each student; OUTPUT_DIR/metrics.json sums their cost.
    """
    check_output_dir(cfg, overwrite)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json_atomic(out / RUN_CONFIG, to_dict(cfg))
    students = []
    for k in range(cfg.options.num_students):
        sub = student_config(cfg, k)
        final = build_trainer(sub, overwrite).train()
        if "interrupted" in final:
            return {**final, "student": k}
        students.append(json.loads((Path(sub.output_dir) / "metrics.json").read_text()))
    pipeline = out / "pipeline"
    metrics = {"step": sum(m["step"] for m in students), "train_seconds": sum(m["train_seconds"] for m in students),
               "students": [{"step": m["step"], "train_seconds": m["train_seconds"], "final": m["final"]}
                            for m in students], "history": []}
    if is_main_process():
        assemble_students(cfg, pipeline)
        write_json_atomic(out / "metrics.json", metrics)
        write_model_card(pipeline, to_dict(cfg), metrics)
    return {"pipeline": str(pipeline), "step": metrics["step"], "train_seconds": metrics["train_seconds"]}


def assemble_students(cfg: RunConfig, out: Path | None = None) -> Path:
    """One MultiStudentPipeline from the students' exported pipelines and the run's router."""
    from onestep.distillers.msd import build_router
    from onestep.export.pipeline import export_students
    from onestep.models.loading import load_model

    teacher = load_teacher(cfg)
    router = build_router(cfg.options, teacher, build_conditions(cfg, teacher, data_source(cfg, teacher)))
    folders = [Path(student_config(cfg, k).output_dir) / "pipeline" for k in range(cfg.options.num_students)]
    missing = [str(f) for f in folders if not (f / "model_index.json").is_file()]
    if missing:
        raise UserInputError(f"student pipeline missing: {missing[0]} (train that student first)")
    unets = [load_model(f / "unet") for f in folders]
    return export_students(unets, teacher, router, cfg.options.generator_timesteps,
                           out or Path(cfg.output_dir) / "pipeline")


def build_trainer(cfg: RunConfig, overwrite: bool = False) -> Trainer:
    check_output_dir(cfg, overwrite)
    set_seed(cfg.train.seed)  # building a task may draw random numbers too (DisBack records its path)
    # what a task writes while it is built (DisBack's path, the regression pairs) is written once: the main process
    # builds first, the others then find the files complete and read them
    with process_state().main_process_first():
        task = task_kind(cfg.method, cfg.data.name).build(cfg)
    if cfg.teacher.offload and hasattr(task, "teacher"):
        if getattr(task, "shares_base", None) and task.shares_base(critic=False):
            raise UserInputError("teacher.offload moves the teacher's weights off the accelerator between its calls, "
                                 "but with options.lora.share_base they are the LoRA networks' base too: set "
                                 "options.lora.share_base=false")
        task.teacher.offload(process_state().device)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json_atomic(Path(cfg.output_dir) / RUN_CONFIG, to_dict(cfg))
    return Trainer(task, cfg.output_dir, cfg.train, run_config=to_dict(cfg))


def export_run(run_dir: Path, out: Path | None = None, step: int | None = None) -> Path:
    """Rebuild a run from its saved config, load its newest checkpoint (or the one of `step`) and export the
    pipeline (EMA weights)."""
    saved = run_dir / RUN_CONFIG
    if not saved.is_file():
        raise UserInputError(f"{run_dir} is not a onestep run folder (no {RUN_CONFIG})")
    cfg = config_from(read_json(saved), label=str(saved))
    if Path(cfg.output_dir).resolve() != run_dir.resolve():  # a run folder moved or copied since it trained
        cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none yet (an interrupted run), or unreadable: a card without metrics
        metrics = None
    metrics = metrics if isinstance(metrics, dict) else None
    if cfg.method == "msd" and cfg.options.student is None:
        if step is not None:
            raise UserInputError("an MSD run assembles its students' pipelines: export RUN_DIR/student_K --step N "
                                 "first, then RUN_DIR without --step")
        out = assemble_students(cfg, out)
    else:
        checkpoint = checkpoint_at(run_dir / "checkpoints", step) if step is not None else None
        trainer = build_trainer(cfg)
        if not trainer.resume(checkpoint):
            raise UserInputError(f"{run_dir} has no complete checkpoint to export")
        out = out or run_dir / ("pipeline" if step is None else f"pipeline-{step}")
        with trainer.ema_weights():
            trainer.task.export_pipeline(out)
        if metrics is not None and metrics.get("step") != trainer.step:
            metrics = None  # measured at another step than the checkpoint exported
    write_model_card(out, to_dict(cfg), metrics)
    return out
