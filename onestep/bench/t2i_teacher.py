"""The teacher rows of the digits-t2i table (scripts/t2i_table.py): the teacher at K guided steps of its sampler
(DDIM for the miniature SD, the Euler ODE for a flow teacher such as builtin:digits-flow) under the run's judge (its
prompts, noise seed, metrics and evaluator), through the teacher-row cache."""

from __future__ import annotations

import hashlib

from onestep.bench.teacher_rows import cached_row, folder_digest
from onestep.config import RunConfig, to_dict
from onestep.eval.classifier import ASSETS
from onestep.eval.judge import Judge
from onestep.models.loading import denoiser_folder, resolve_model
from onestep.runs import load_teacher
from onestep.sampling.teacher import sampler_label


T2I_STEPS = (4, 10, 25)  # the table's default teacher steps
COLUMNS = ("fd_t2i", "digit_acc", "colour_acc", "colour_balance", "images_per_s")
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler"}  # how a row's name says it


def t2i_sampler(cfg: RunConfig) -> str:
    """The sampler of the run's teacher, as onestep.sampling.teacher.sampler_label names it, read from its folder
    without loading it: "euler" for a flow transformer, else "ddim"."""
    folder = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    return "euler" if denoiser_folder(folder) == "transformer" else "ddim"


def t2i_teacher_protocol(cfg: RunConfig, judge: Judge, steps: int) -> dict:
    """Everything a teacher row depends on besides the teacher's weights (the cache key)."""
    prompts = hashlib.sha256("\n".join(judge.prompts or []).encode()).hexdigest()
    teacher = {k: v for k, v in to_dict(cfg.teacher).items() if k in ("variant", "guidance_scale", "dtype")}
    return {"table": "scripts/t2i_table.py", "sampler": t2i_sampler(cfg), "steps": steps, "teacher": teacher,
            "eval": to_dict(cfg.eval), "judge_seed": judge.seed, "prompts": prompts,
            "evaluator": folder_digest(ASSETS / "digits_t2i_classifier")}


def t2i_teacher_row(cfg: RunConfig, judge: Judge, steps: int) -> dict:
    """The teacher's row at `steps` guided steps of its sampler (DDIM, or a flow teacher's Euler ODE), sampled and
    scored."""
    teacher = load_teacher(cfg)
    metrics = judge.teacher_metrics(teacher, [steps])
    sampler = sampler_label(teacher)
    return {"name": f"teacher {steps} {SAMPLER_NAMES[sampler]} (cfg {teacher.guidance_scale:g})",
            **{c: metrics[f"{c}/teacher_{sampler}{steps}"] for c in COLUMNS}, "protocol": metrics["protocol"]}


def cached_t2i_teacher_row(cfg: RunConfig, judge: Judge, steps: int, use_cache: bool = True) -> dict:
    teacher = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    return cached_row(teacher, t2i_teacher_protocol(cfg, judge, steps), lambda: t2i_teacher_row(cfg, judge, steps),
                      "scripts/t2i_table.py", use_cache)
